DROP TABLE pending_users;
