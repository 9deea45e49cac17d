//! A server running on its own thread and runtime, listening on loopback: what the
//! end-to-end tests and `bench-serve` talk to with a real HTTP client.

use super::{ApiBuilder, BatchHook};
use crate::config::Config;
use crate::server::ModelPool;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub struct RunningServer {
    pub addr: SocketAddr,
    pub pool: Arc<ModelPool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl RunningServer {
    /// Binds `config.server.listen` (use port 0 for a free port), starts the workers and waits
    /// until every model has loaded.
    pub fn start(config: Config, hook: Option<BatchHook>) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let listen = config.server.listen.clone();
        let mut builder = ApiBuilder::new(config);
        if let Some(h) = hook {
            builder = builder.batch_hook(h);
        }
        let api = builder.build()?;
        let pool = api.pool().clone();
        let listener = runtime.block_on(tokio::net::TcpListener::bind(&listen))?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("http-{addr}"))
            .spawn(move || {
                runtime.block_on(api.serve(listener, async move {
                    let _ = stopped.await;
                }))
            })?;
        let server = Self {
            addr,
            pool,
            stop: Some(stop),
            thread: Some(thread),
        };
        let wait = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        wait.block_on(async {
            tokio::time::timeout(Duration::from_secs(600), server.pool.wait_loaded())
                .await
                .map_err(|_| anyhow::anyhow!("models did not load within 10 minutes"))?
                .map_err(|e| anyhow::anyhow!(e))
        })?;
        Ok(server)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Graceful shutdown: stop accepting, finish in-flight requests, drain the workers.
    pub fn stop(mut self) -> std::io::Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> std::io::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| std::io::Error::other("server thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}
