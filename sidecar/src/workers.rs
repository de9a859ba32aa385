//! `--workers N`: N single-threaded runtimes, each with its own listener on every address
//! (SO_REUSEPORT, so the kernel spreads new connections over them) and its own epoll. A
//! connection lives on one thread from accept to close: no work stealing, no cross-thread
//! wake-ups, which on a busy node cost more than they bring (the nginx/HAProxy model).
//!
//! Worker 0 is the runtime the sidecar already runs on (admin, identity, signals); workers
//! 1..N get a thread each. Identity, policy and counters are shared.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use tokio::net::{TcpListener, TcpSocket};
use tokio_util::task::TaskTracker;

/// Why the workers could not listen or start.
#[derive(Debug, thiserror::Error)]
pub enum WorkersError {
    /// The address is taken, not local, or not allowed: pick another or free it.
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start a worker runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot start a worker thread")]
    Thread(#[source] std::io::Error),
}

impl WorkersError {
    /// The OS error under a failed listen, to tell "no IPv6 here" from "port taken".
    pub fn listen_errno(&self) -> Option<i32> {
        match self {
            WorkersError::Listen { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

type Result<T, E = WorkersError> = std::result::Result<T, E>;

type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What each worker serves, collected before any starts.
pub struct Workers {
    jobs: Vec<Vec<Job>>,
}

impl Workers {
    pub fn new(count: usize) -> Self {
        Self {
            jobs: (0..count.max(1)).map(|_| Vec::new()).collect(),
        }
    }

    pub fn count(&self) -> usize {
        self.jobs.len()
    }

    /// Binds `addr` once per worker (SO_REUSEPORT when there are several) and gives each
    /// worker `serve` of its own listener. Every listener is bound when this returns, so a
    /// taken port fails here, before anything is served. Returns the address bound (the port
    /// chosen, for port 0).
    pub fn listen<F, Fut>(&mut self, addr: SocketAddr, serve: F) -> Result<SocketAddr>
    where
        F: FnOnce(TcpListener) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.listen_with(addr, false, serve)
    }

    /// [`Self::listen`] on an IPv6 address with IPV6_V6ONLY, beside a listener on the IPv4
    /// address of the same port (`[::]:15006` beside `0.0.0.0:15006`).
    pub fn listen_v6_only<F, Fut>(&mut self, addr: SocketAddr, serve: F) -> Result<SocketAddr>
    where
        F: FnOnce(TcpListener) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.listen_with(addr, true, serve)
    }

    fn listen_with<F, Fut>(
        &mut self,
        addr: SocketAddr,
        v6_only: bool,
        serve: F,
    ) -> Result<SocketAddr>
    where
        F: FnOnce(TcpListener) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let shared = self.count() > 1;
        let mut at = addr;
        if shared {
            // SECURITY: SO_REUSEPORT would also let this join a group that another process of
            // the same user (a second sidecar) holds, and split its traffic: the address must
            // be free first.
            let listen = |source| WorkersError::Listen { addr, source };
            let probe = bind(addr, false, v6_only).map_err(listen)?;
            at = probe.local_addr().map_err(listen)?;
        }
        let mut bound = Vec::with_capacity(self.count());
        for _ in 0..self.count() {
            let listen = |source| WorkersError::Listen { addr, source };
            let listener = bind(at, shared, v6_only).map_err(listen)?;
            // Port 0: the others join the port the first one got.
            at = listener.local_addr().map_err(listen)?;
            // Detached from this runtime; registered again on the worker's when it first runs.
            bound.push(listener.into_std().map_err(listen)?);
        }
        for (jobs, listener) in self.jobs.iter_mut().zip(bound) {
            jobs.push(Box::pin(serve_later(listener, addr, serve.clone())));
        }
        Ok(at)
    }

    /// Starts worker 0's jobs on the current runtime and a thread with a runtime of its own
    /// for each other worker; `tasks` waits for all of them.
    pub fn start(self, tasks: &TaskTracker) -> Result<()> {
        let mut jobs = self.jobs.into_iter();
        for job in jobs.next().into_iter().flatten() {
            tasks.spawn(job);
        }
        for (w, own) in jobs.enumerate() {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(WorkersError::Runtime)?;
            let done = tasks.token();
            std::thread::Builder::new()
                .name(format!("kith-worker-{}", w + 1))
                .spawn(move || {
                    rt.block_on(async move {
                        let mut set = tokio::task::JoinSet::new();
                        for job in own {
                            set.spawn(job);
                        }
                        while set.join_next().await.is_some() {}
                    });
                    drop(done);
                })
                .map_err(WorkersError::Thread)?;
        }
        Ok(())
    }
}

/// `serve` of `listener`, registered with the runtime that first polls this.
async fn serve_later<F, Fut>(listener: std::net::TcpListener, addr: SocketAddr, serve: F)
where
    F: FnOnce(TcpListener) -> Fut,
    Fut: Future<Output = ()>,
{
    match TcpListener::from_std(listener) {
        Ok(l) => serve(l).await,
        Err(e) => tracing::error!(%addr, error = %e, "cannot register the listener"),
    }
}

/// A listening socket on `addr`; `shared` adds SO_REUSEPORT so that the other workers can
/// bind the same address (only sockets of the same user can join the group).
fn bind(addr: SocketAddr, shared: bool, v6_only: bool) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if v6_only && addr.is_ipv6() {
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv6V6Only, &true)?;
    }
    socket.set_reuseaddr(true)?;
    if shared {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(1024)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Three workers on one port: all bound up front, each on its own thread, and between them
    /// they take every connection.
    #[tokio::test]
    async fn workers_share_one_port_and_each_serves() {
        let mut pool = Workers::new(3);
        let served = Arc::new(AtomicUsize::new(0));
        let threads = Arc::new(Mutex::new(HashSet::new()));
        let (port_tx, mut port_rx) = tokio::sync::mpsc::unbounded_channel();
        let (count, seen) = (served.clone(), threads.clone());
        let addr = "127.0.0.1:0".parse().expect("addr");
        pool.listen(addr, move |l: TcpListener| async move {
            let _ = port_tx.send(l.local_addr().map(|a| a.port()).unwrap_or(0));
            while let Ok((mut s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let name = std::thread::current().name().map(str::to_owned);
                seen.lock().expect("lock").insert(name);
                let _ = s.write_all(b"x").await;
            }
        })
        .expect("listen");
        let tasks = TaskTracker::new();
        pool.start(&tasks).expect("start");
        let mut ports = Vec::new();
        for _ in 0..3 {
            ports.push(port_rx.recv().await.expect("port"));
        }
        assert!(
            ports.iter().all(|p| *p == ports[0] && *p != 0),
            "one port: {ports:?}"
        );
        for _ in 0..200 {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", ports[0]))
                .await
                .expect("connect");
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.expect("served");
        }
        assert_eq!(served.load(Ordering::SeqCst), 200);
        // The kernel hashes connections over the group: 200 connections reach more than one.
        let seen = threads.lock().expect("lock").clone();
        assert!(seen.len() >= 2, "{seen:?}");
    }

    #[tokio::test]
    async fn a_taken_port_fails_before_anything_runs() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut pool = Workers::new(2);
        let err = pool
            .listen(taken.local_addr().expect("addr"), |_l: TcpListener| async {
            })
            .expect_err("taken");
        assert!(err.to_string().contains("cannot listen on"), "{err}");

        // Nor does a second group join the port of a first (another sidecar of the same user).
        let mut first = Workers::new(2);
        let at = first
            .listen(
                "127.0.0.1:0".parse().expect("addr"),
                |_l: TcpListener| async {},
            )
            .expect("first");
        let mut second = Workers::new(2);
        let err = second
            .listen(at, |_l: TcpListener| async {})
            .expect_err("joined another group");
        let err = identity::report::chain(&err);
        assert!(err.contains("in use"), "{err}");
    }
}
