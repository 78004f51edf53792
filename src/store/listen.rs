//! A dedicated LISTEN connection. It is opened outside the pool: a pooled connection is shared and
//! recycled, and a notification arrives only on the connection that listens.

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::AsyncMessage;

use super::{Store, StoreError};

/// The payloads of the notifications heard on one channel, in commit order.
pub struct Notifications {
    payloads: mpsc::UnboundedReceiver<String>,
    /// Polls the connection, which both moves the client's queries along and yields notifications.
    pump: JoinHandle<Result<(), tokio_postgres::Error>>,
    /// Dropped to close the connection.
    client: Option<tokio_postgres::Client>,
}

impl Store {
    /// Opens a connection of its own (TLS as DATABASE_URL says) and LISTENs on `channel` (an SQL
    /// identifier idmap chose, never caller input).
    pub async fn listen(&self, channel: &str) -> Result<Notifications, StoreError> {
        listen(self, channel).await
    }
}

async fn listen(store: &Store, channel: &str) -> Result<Notifications, StoreError> {
    let (client, mut connection) = store.database.connect().await?;
    let (tx, payloads) = mpsc::unbounded_channel();
    let pump = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_owned()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    client
        // Named, so an operator (or a test) can tell it from the pool's connections.
        .batch_execute(&format!(
            "SET application_name = 'idmap-listen'; LISTEN {channel}"
        ))
        .await
        .map_err(StoreError::from_postgres)?;
    Ok(Notifications {
        payloads,
        pump,
        client: Some(client),
    })
}

impl Notifications {
    /// The next payload; `None` once the connection has ended ([`Notifications::ended`] says why).
    pub async fn next(&mut self) -> Option<String> {
        self.payloads.recv().await
    }

    /// Checks that the connection still answers within `limit`: a connection cut without a FIN
    /// (a failover, a dropped NAT entry) otherwise looks idle for as long as the kernel's timeouts.
    pub async fn ping(&self, limit: std::time::Duration) -> Result<(), StoreError> {
        let Some(client) = &self.client else {
            return Err(StoreError::Unavailable(
                "the listening connection is closed".into(),
            ));
        };
        match tokio::time::timeout(limit, client.simple_query("SELECT 1")).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(StoreError::from_postgres(e)),
            Err(_) => Err(StoreError::Unavailable(format!(
                "the listening connection did not answer a heartbeat within {limit:?}"
            ))),
        }
    }

    /// Why the connection ended.
    pub async fn ended(mut self) -> StoreError {
        self.client = None;
        match (&mut self.pump).await {
            Ok(Err(e)) => StoreError::from_postgres(e),
            _ => StoreError::Unavailable("the database closed the listening connection".into()),
        }
    }
}

impl Drop for Notifications {
    fn drop(&mut self) {
        self.pump.abort();
    }
}
