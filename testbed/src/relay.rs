//! A TCP relay a test can cut: it listens in a namespace and forwards each connection to an
//! upstream address. Cut, it stops forwarding in both directions and holds every connection
//! open, accepted ones included (what a dropped link does: no reset, no answer); healed, it
//! forwards again.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Result};

use crate::netns::{enter, Netns};

/// How often a blocked relay thread looks at the switches.
const LOOK: Duration = Duration::from_millis(50);

#[derive(Clone, Default)]
struct Switches {
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Switches {
    fn cut(&self) -> bool {
        self.cut.load(Ordering::Relaxed)
    }
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

pub struct TcpRelay {
    pub listen: SocketAddr,
    switches: Switches,
    acceptor: Option<JoinHandle<()>>,
}

impl TcpRelay {
    /// Listens on `listen` inside `ns` and relays to `upstream`, connected from `ns` too.
    pub fn start(ns: &Netns, listen: SocketAddr, upstream: SocketAddr) -> Result<TcpRelay> {
        let file = ns.file()?;
        let switches = Switches::default();
        let (bound_tx, bound_rx) = mpsc::channel();
        let s = switches.clone();
        let acceptor = std::thread::spawn(move || {
            // Threads spawned from here are in `ns` too.
            let bound = enter(&file).and_then(|()| {
                let l = TcpListener::bind(listen)?;
                l.set_nonblocking(true)?;
                Ok(l)
            });
            let listener = match bound {
                Ok(l) => {
                    let _ = bound_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = bound_tx.send(Err(e));
                    return;
                }
            };
            let mut connections = Vec::new();
            while !s.stopped() {
                match listener.accept() {
                    Ok((client, _)) => {
                        let s = s.clone();
                        connections.push(std::thread::spawn(move || relay(client, upstream, s)));
                    }
                    Err(_) => std::thread::sleep(LOOK),
                }
            }
            for c in connections {
                let _ = c.join();
            }
        });
        bound_rx
            .recv()
            .map_err(|_| anyhow!("the relay on {listen} did not start"))?
            .map_err(|e| anyhow!("relay on {listen}: {e:#}"))?;
        Ok(TcpRelay {
            listen,
            switches,
            acceptor: Some(acceptor),
        })
    }

    /// Nothing passes from now on, either way; connections stay open.
    pub fn cut(&self) {
        self.switches.cut.store(true, Ordering::Relaxed);
    }

    /// Forwarding again, on the connections held open and new ones.
    pub fn heal(&self) {
        self.switches.cut.store(false, Ordering::Relaxed);
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.switches.stop.store(true, Ordering::Relaxed);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

/// One connection: upstream is dialled once the link is up, then bytes are pumped both ways.
fn relay(client: TcpStream, upstream: SocketAddr, s: Switches) {
    while s.cut() {
        if s.stopped() {
            return;
        }
        std::thread::sleep(LOOK);
    }
    let Ok(server) = TcpStream::connect_timeout(&upstream, Duration::from_secs(3)) else {
        return; // the upstream is down: the client sees its connection close
    };
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let up = {
        let s = s.clone();
        std::thread::spawn(move || pump(client, server, s))
    };
    pump(s2, c2, s);
    let _ = up.join();
}

/// Copies `from` to `to` while the link is up; at its end, ends `to`'s sending side.
fn pump(mut from: TcpStream, mut to: TcpStream, s: Switches) {
    let _ = from.set_read_timeout(Some(LOOK));
    let _ = to.set_write_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; 16 * 1024];
    while !s.stopped() {
        if s.cut() {
            // Unread bytes wait in the kernel: the peers' windows fill, as on a dead link.
            std::thread::sleep(LOOK);
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
