//! The rtnetlink connection that route programming and interface discovery share: opened in the
//! network namespace of the calling thread, driven on the current tokio runtime, closed on drop.

use std::io;

use rtnetlink::Handle;
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
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
    }
}
