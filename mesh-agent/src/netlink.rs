//! The rtnetlink connection that route programming and interface discovery share: opened in the
//! network namespace of the calling thread, driven on the current tokio runtime, closed on drop.

use std::io;

use futures::TryStreamExt;
use rtnetlink::{
    Handle,
    packet_route::{address::AddressMessage, link::LinkMessage, route::RouteMessage},
};
use tokio::task::AbortHandle;

/// An open rtnetlink connection. Dropping it stops the task that drives the socket.
#[derive(Debug)]
pub(crate) struct Connection {
    handle: Handle,
    task: AbortHandle,
}

impl Connection {
    /// Opens the socket and spawns its driver on the current tokio runtime.
    pub(crate) fn open() -> io::Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        let task = tokio::spawn(connection).abort_handle();
        Ok(Self { handle, task })
    }

    /// The request handle of the connection.
    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Every link of the namespace.
    pub(crate) async fn links(&self) -> Result<Vec<LinkMessage>, rtnetlink::Error> {
        self.handle.link().get().execute().try_collect().await
    }

    /// Every address of the namespace, both families.
    pub(crate) async fn addresses(&self) -> Result<Vec<AddressMessage>, rtnetlink::Error> {
        self.handle.address().get().execute().try_collect().await
    }

    /// The routes of the family (and table, protocol, ...) that `filter` is built for.
    pub(crate) async fn routes(
        &self,
        filter: RouteMessage,
    ) -> Result<Vec<RouteMessage>, rtnetlink::Error> {
        self.handle
            .route()
            .get(filter)
            .execute()
            .try_collect()
            .await
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
    }
}
