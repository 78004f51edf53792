DROP TABLE user_external_ids;
DROP TABLE users;
