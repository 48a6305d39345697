//! The client listener: accepts connections until shutdown and starts one session task per
//! client (its log lines get a span only when one is logged; see `session::serve`).

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::context::Context;
use crate::session;

/// Accepts until soft shutdown. Session tasks are tracked so shutdown can wait for them.
pub async fn accept_loop(ctx: Arc<Context>, listener: TcpListener) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        debug!(%peer, error = %e, "client hung up before it was served");
                        continue;
                    }
                    // Boxed: the task then holds a pointer, not the whole session future
                    // (kilobytes), which spawning and finishing the task would copy.
                    let session = Box::pin(session::serve(ctx.clone(), stream, peer));
                    ctx.shutdown.sessions.spawn(session);
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    warn!(error = %e, "accept failed");
                    crate::timer::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = ctx.shutdown.soft.cancelled() => return,
        }
    }
}
