//! The rendezvous of multi-process training, in torchrun's convention: every process knows its
//! `RANK`, the `WORLD_SIZE` and rank 0's `MASTER_ADDR:MASTER_PORT`. Rank 0 listens there, every
//! other rank connects and introduces itself, and once all have arrived rank 0 hands each the same
//! id (NCCL's unique id, on GPUs). A rank that never arrives is an error on every rank that did,
//! naming it, once the timeout has passed.
//!
//! The connections then stay open as a liveness channel ([`Rendezvous::watch`]): a rank whose
//! process dies closes its socket, rank 0 tells the others which rank it was, and each rank's
//! [`Watch::check`] reports it instead of the rank waiting forever in a collective.
//!
//! The messages: a hello from rank r (`EMMA-RDV`, protocol version, r and the world size, each a
//! little-endian u32); rank 0's answer, `I` and the id or `A` and the reason to abort (a
//! little-endian u32 length, then the bytes); and `D`, empty, from a rank that finished.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The first bytes of every hello.
const MAGIC: &[u8; 8] = b"EMMA-RDV";
/// The protocol version in the hello.
const VERSION: u32 = 1;
/// The longest id or message accepted (an NCCL unique id is 128 bytes).
const MAX_PAYLOAD: u32 = 1 << 16;
/// Pause between attempts to reach rank 0 (it may start after the others).
const RETRY: Duration = Duration::from_millis(100);

/// What went wrong at the rendezvous, naming the rank, address or variable at fault.
#[derive(Debug, thiserror::Error)]
pub enum RendezvousError {
    /// A torchrun variable is missing or malformed.
    #[error("environment variable {name}: {detail}")]
    Env {
        /// The variable.
        name: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// Rank 0 could not listen on its address.
    #[error("rank 0 cannot listen on {addr}: {source}")]
    Listen {
        /// MASTER_ADDR:MASTER_PORT.
        addr: String,
        /// The system's reason.
        source: std::io::Error,
    },
    /// Rank 0 was not reachable within the timeout.
    #[error("rank {rank}: rank 0 at {addr} was not reachable within {timeout:?} (last error: {last})")]
    Unreachable {
        /// This rank.
        rank: usize,
        /// MASTER_ADDR:MASTER_PORT.
        addr: String,
        /// How long it tried.
        timeout: Duration,
        /// The last connection error.
        last: String,
    },
    /// Some ranks did not arrive within the timeout.
    #[error("rank(s) {} of {world} did not arrive at the rendezvous within {timeout:?}", list(.missing))]
    Missing {
        /// The ranks that never introduced themselves.
        missing: Vec<usize>,
        /// The world size.
        world: usize,
        /// How long rank 0 waited.
        timeout: Duration,
    },
    /// A peer broke the protocol (another program on the port, a different world size, a
    /// rank given twice).
    #[error("rendezvous at {addr}: {detail}")]
    Protocol {
        /// MASTER_ADDR:MASTER_PORT.
        addr: String,
        /// What was wrong.
        detail: String,
    },
    /// Rank 0 aborted the rendezvous or the run, and said why.
    #[error("rank {rank}: rank 0 aborted: {reason}")]
    Aborted {
        /// This rank.
        rank: usize,
        /// Rank 0's message.
        reason: String,
    },
    /// A rank sent nothing for longer than the timeout during the run (hung, or far slower
    /// than the others).
    #[error("rank {rank} sent nothing to rank {seen_by} for {waited:?} (hung? raise --rank-timeout if a rank is legitimately busy this long)")]
    Silent {
        /// The silent rank.
        rank: usize,
        /// The rank that waited.
        seen_by: usize,
        /// How long it waited.
        waited: Duration,
    },
    /// A rank's process died or closed its connection during the run.
    #[error("rank {dead} left the run (its connection to rank {seen_by} closed: {detail})")]
    RankLost {
        /// The rank that is gone.
        dead: usize,
        /// The rank that noticed.
        seen_by: usize,
        /// How the connection ended.
        detail: String,
    },
    /// A rank's buffer in a collective that needs equally long buffers had another length.
    #[error("rank {rank} sent {len} values to a collective over buffers of {expected}")]
    Mismatched {
        /// The rank at fault.
        rank: usize,
        /// The length it sent.
        len: usize,
        /// The length every rank must send.
        expected: usize,
    },
}

impl RendezvousError {
    /// [`RendezvousError::RankLost`]: `dead`'s connection, read by `seen_by`, failed with `e`.
    pub(crate) fn lost(dead: usize, seen_by: usize, e: &std::io::Error) -> Self {
        RendezvousError::RankLost {
            dead,
            seen_by,
            detail: if e.kind() == ErrorKind::UnexpectedEof {
                "end of stream".into()
            } else {
                e.to_string()
            },
        }
    }
}

/// A local TCP port that is free right now (bound, then released): a `MASTER_PORT` for ranks
/// that all run on this machine.
pub fn free_local_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Comma-separated ranks.
fn list(ranks: &[usize]) -> String {
    ranks.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ")
}

/// One process's place in the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// This process's rank, 0 ≤ rank < world.
    pub rank: usize,
    /// Its rank among the processes of its machine (`LOCAL_RANK`; the rank when unset): which
    /// of the machine's GPUs it runs on.
    pub local_rank: usize,
    /// The number of processes.
    pub world: usize,
    /// Rank 0's `host:port`.
    pub addr: String,
    /// How long to wait for the others (and for rank 0 to be reachable).
    pub timeout: Duration,
}

impl Peer {
    /// The peer described by torchrun's `RANK`, `WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT`,
    /// or `None` when `WORLD_SIZE` is not set (a single-process run). The variables are read
    /// through `var`, so that tests need not touch the process environment.
    pub fn from_vars(
        var: impl Fn(&str) -> Option<String>,
        timeout: Duration,
    ) -> Result<Option<Peer>, RendezvousError> {
        let Some(world) = var("WORLD_SIZE") else {
            return Ok(None);
        };
        let number = |name: &'static str, value: Option<String>| -> Result<usize, RendezvousError> {
            let value = value.ok_or_else(|| RendezvousError::Env {
                name,
                detail: "not set (WORLD_SIZE is)".into(),
            })?;
            value.trim().parse().map_err(|_| RendezvousError::Env {
                name,
                detail: format!("'{value}' is not a non-negative integer"),
            })
        };
        let world = number("WORLD_SIZE", Some(world))?;
        let rank = number("RANK", var("RANK"))?;
        let local_rank = match var("LOCAL_RANK") {
            Some(v) => number("LOCAL_RANK", Some(v))?,
            None => rank,
        };
        if world == 0 || rank >= world {
            return Err(RendezvousError::Env {
                name: "RANK",
                detail: format!("rank {rank} is not below WORLD_SIZE {world}"),
            });
        }
        let host = var("MASTER_ADDR").ok_or_else(|| RendezvousError::Env {
            name: "MASTER_ADDR",
            detail: "not set (WORLD_SIZE is)".into(),
        })?;
        let port = number("MASTER_PORT", var("MASTER_PORT"))?;
        if port == 0 || port > u16::MAX as usize {
            return Err(RendezvousError::Env {
                name: "MASTER_PORT",
                detail: format!("{port} is not a port (1-65535)"),
            });
        }
        Ok(Some(Peer {
            rank,
            local_rank,
            world,
            addr: format!("{host}:{port}"),
            timeout,
        }))
    }

    /// Meets the other ranks and returns the id every rank got: rank 0 calls `make_id` once
    /// all have arrived. Errors name the ranks that did not arrive or the peer at fault.
    pub fn join(&self, make_id: impl FnOnce() -> Vec<u8>) -> Result<Rendezvous, RendezvousError> {
        if self.rank == 0 {
            self.serve(make_id)
        } else {
            self.connect()
        }
    }

    /// Rank 0: accepts every other rank, then sends each the id.
    fn serve(&self, make_id: impl FnOnce() -> Vec<u8>) -> Result<Rendezvous, RendezvousError> {
        let listener = TcpListener::bind(&self.addr).map_err(|source| RendezvousError::Listen {
            addr: self.addr.clone(),
            source,
        })?;
        let protocol = |detail: String| RendezvousError::Protocol {
            addr: self.addr.clone(),
            detail,
        };
        listener
            .set_nonblocking(true)
            .map_err(|e| protocol(format!("cannot poll the listener: {e}")))?;
        let deadline = Instant::now() + self.timeout;
        let mut links: Vec<Option<TcpStream>> = (0..self.world).map(|_| None).collect();
        let mut arrived = 1;
        while arrived < self.world {
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing = (1..self.world).filter(|&r| links[r].is_none()).collect();
                        let err = RendezvousError::Missing {
                            missing,
                            world: self.world,
                            timeout: self.timeout,
                        };
                        abort_all(links.iter_mut().flatten(), &err.to_string());
                        return Err(err);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => return Err(protocol(format!("accepting a rank: {e}"))),
            };
            let mut stream = stream;
            let hello = stream
                .set_nonblocking(false)
                .and_then(|()| stream.set_read_timeout(Some(remaining(deadline))))
                .and_then(|()| read_hello(&mut stream));
            let rank = match hello {
                Ok(Hello { rank, world }) if world != self.world => Err(format!(
                    "rank {rank} says the world has {world} ranks; rank 0 has WORLD_SIZE {}",
                    self.world
                )),
                Ok(Hello { rank, .. }) if rank == 0 || rank >= self.world => {
                    Err(format!("a peer says it is rank {rank} of {}", self.world))
                }
                Ok(Hello { rank, .. }) if links[rank].is_some() => Err(format!(
                    "rank {rank} arrived twice (two processes with RANK={rank}?)"
                )),
                Ok(Hello { rank, .. }) => Ok(rank),
                Err(e) => Err(format!("a connection that did not say hello: {e}")),
            };
            match rank {
                Ok(rank) => {
                    links[rank] = Some(stream);
                    arrived += 1;
                }
                Err(detail) => {
                    let err = protocol(detail);
                    let _ = send(&mut stream, b'A', err.to_string().as_bytes());
                    abort_all(links.iter_mut().flatten(), &err.to_string());
                    return Err(err);
                }
            }
        }
        let id = make_id();
        let mut kept = Vec::with_capacity(self.world - 1);
        for (rank, stream) in links.into_iter().enumerate() {
            let Some(mut stream) = stream else { continue };
            send(&mut stream, b'I', &id)
                .map_err(|e| protocol(format!("sending the id to rank {rank}: {e}")))?;
            kept.push((rank, stream));
        }
        Ok(Rendezvous {
            rank: 0,
            world: self.world,
            id,
            links: kept,
        })
    }

    /// Any other rank: reaches rank 0 (retrying until the timeout), says hello, reads the id.
    fn connect(&self) -> Result<Rendezvous, RendezvousError> {
        let deadline = Instant::now() + self.timeout;
        let mut stream = loop {
            let attempt = self
                .addr
                .to_socket_addrs()
                .and_then(|mut addrs| addrs.next().ok_or_else(|| ErrorKind::NotFound.into()))
                .and_then(|a| TcpStream::connect_timeout(&a, remaining(deadline).max(RETRY)));
            match attempt {
                Ok(stream) => break stream,
                Err(e) if Instant::now() + RETRY >= deadline => {
                    return Err(RendezvousError::Unreachable {
                        rank: self.rank,
                        addr: self.addr.clone(),
                        timeout: self.timeout,
                        last: e.to_string(),
                    })
                }
                Err(_) => std::thread::sleep(RETRY),
            }
        };
        let protocol = |detail: String| RendezvousError::Protocol {
            addr: self.addr.clone(),
            detail,
        };
        let mut hello = MAGIC.to_vec();
        for v in [VERSION, self.rank as u32, self.world as u32] {
            hello.extend(v.to_le_bytes());
        }
        stream
            .write_all(&hello)
            .map_err(|e| protocol(format!("rank {}: sending hello: {e}", self.rank)))?;
        // Rank 0 answers once every rank has arrived, or aborts at its own timeout: wait a
        // little longer than that.
        stream
            .set_read_timeout(Some(
                remaining(deadline) + self.timeout / 10 + Duration::from_secs(1),
            ))
            .map_err(|e| protocol(e.to_string()))?;
        match read_message(&mut stream) {
            Ok((b'I', id)) => Ok(Rendezvous {
                rank: self.rank,
                world: self.world,
                id,
                links: vec![(0, stream)],
            }),
            Ok((b'A', reason)) => Err(RendezvousError::Aborted {
                rank: self.rank,
                reason: String::from_utf8_lossy(&reason).into_owned(),
            }),
            Ok((tag, _)) => Err(protocol(format!(
                "rank 0 sent an unknown message '{}'",
                tag as char
            ))),
            Err(e) => Err(protocol(format!(
                "rank {}: no id from rank 0 ({e}); is every rank started?",
                self.rank
            ))),
        }
    }
}

/// Time left before `deadline` (at least a millisecond: a zero timeout means "none" to sockets).
fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// A rank's introduction.
struct Hello {
    rank: usize,
    world: usize,
}

/// Reads and checks a hello.
fn read_hello(stream: &mut TcpStream) -> std::io::Result<Hello> {
    let mut buf = [0u8; 20];
    stream.read_exact(&mut buf)?;
    let word = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().expect("4 bytes"));
    if &buf[..8] != MAGIC || word(8) != VERSION {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            "not an emma-rs rendezvous hello (another program on MASTER_PORT, or another version)",
        ));
    }
    Ok(Hello {
        rank: word(12) as usize,
        world: word(16) as usize,
    })
}

/// Sends a tagged message.
pub(crate) fn send(stream: &mut TcpStream, tag: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut msg = vec![tag];
    msg.extend((payload.len() as u32).to_le_bytes());
    msg.extend(payload);
    stream.write_all(&msg)
}

/// Reads a tagged message.
fn read_message(stream: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    Ok((read_tag(stream)?, read_payload(stream)?))
}

/// Reads a message's one-byte tag.
pub(crate) fn read_tag(input: &mut impl Read) -> std::io::Result<u8> {
    let mut tag = [0u8; 1];
    input.read_exact(&mut tag)?;
    Ok(tag[0])
}

/// Reads a message's payload, after its tag: a little-endian u32 length, then the bytes.
pub(crate) fn read_payload(input: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    input.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_PAYLOAD {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("a message of {len} bytes"),
        ));
    }
    let mut payload = vec![0; len as usize];
    input.read_exact(&mut payload)?;
    Ok(payload)
}

/// Tells every connected rank to abort, with `reason` (best effort: a rank may be gone).
pub(crate) fn abort_all<'a>(streams: impl Iterator<Item = &'a mut TcpStream>, reason: &str) {
    for s in streams {
        let _ = send(s, b'A', reason.as_bytes());
    }
}

/// The ranks met: the shared id, and the connections kept open to watch the others.
pub struct Rendezvous {
    /// This process's rank.
    pub rank: usize,
    /// The number of processes.
    pub world: usize,
    /// The id rank 0 handed out (the same bytes on every rank).
    pub id: Vec<u8>,
    /// Rank 0: a connection to every other rank; the others: one to rank 0.
    links: Vec<(usize, TcpStream)>,
}

impl Rendezvous {
    /// The connections (rank 0: one to every other rank, in rank order; the others: one to
    /// rank 0), for a process group to carry its collectives on.
    pub(crate) fn into_links(self) -> Vec<(usize, TcpStream)> {
        self.links
    }

    /// Starts watching the other ranks: a thread per connection waits for it to close. When a
    /// rank's connection closes, rank 0 tells the remaining ranks which rank left, and
    /// [`Watch::check`] reports it on every rank from then on.
    pub fn watch(self) -> Watch {
        let failure: Arc<Mutex<Option<RendezvousError>>> = Arc::default();
        let closing: Arc<AtomicBool> = Arc::default();
        let senders: Arc<Mutex<Vec<(usize, TcpStream)>>> = Arc::new(Mutex::new(
            self.links
                .iter()
                .filter_map(|(r, s)| s.try_clone().ok().map(|s| (*r, s)))
                .collect(),
        ));
        for (peer, mut stream) in self.links {
            let (failure, senders, closing, me) =
                (failure.clone(), senders.clone(), closing.clone(), self.rank);
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(None);
                let message = read_message(&mut stream);
                if closing.load(Ordering::SeqCst) {
                    return; // this rank is leaving: its own shutdown ended the read
                }
                let err = match message {
                    // The peer finished and said goodbye: nothing is wrong.
                    Ok((b'D', _)) => return,
                    Ok((b'A', reason)) => RendezvousError::Aborted {
                        rank: me,
                        reason: String::from_utf8_lossy(&reason).into_owned(),
                    },
                    Ok((tag, _)) => RendezvousError::Protocol {
                        addr: format!("the connection to rank {peer}"),
                        detail: format!("an unexpected message '{}' during the run", tag as char),
                    },
                    Err(e) => RendezvousError::lost(peer, me, &e),
                };
                if me == 0 {
                    let mut senders = senders.lock().unwrap_or_else(|p| p.into_inner());
                    for (_, s) in senders.iter_mut().filter(|(r, _)| *r != peer) {
                        let _ = send(s, b'A', err.to_string().as_bytes());
                    }
                }
                let mut slot = failure.lock().unwrap_or_else(|p| p.into_inner());
                slot.get_or_insert(err);
            });
        }
        Watch {
            rank: self.rank,
            world: self.world,
            id: self.id,
            failure,
            senders,
            closing,
        }
    }
}

/// The other ranks, watched (see [`Rendezvous::watch`]).
pub struct Watch {
    /// This process's rank.
    pub rank: usize,
    /// The number of processes.
    pub world: usize,
    /// The shared id.
    pub id: Vec<u8>,
    failure: Arc<Mutex<Option<RendezvousError>>>,
    senders: Arc<Mutex<Vec<(usize, TcpStream)>>>,
    closing: Arc<AtomicBool>,
}

impl Watch {
    /// Ok while every rank is still there; the first rank lost (or rank 0's abort) otherwise.
    pub fn check(&self) -> Result<(), RendezvousError> {
        let slot = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        match &*slot {
            None => Ok(()),
            Some(RendezvousError::RankLost {
                dead,
                seen_by,
                detail,
            }) => Err(RendezvousError::RankLost {
                dead: *dead,
                seen_by: *seen_by,
                detail: detail.clone(),
            }),
            Some(RendezvousError::Aborted { rank, reason }) => Err(RendezvousError::Aborted {
                rank: *rank,
                reason: reason.clone(),
            }),
            Some(e) => Err(RendezvousError::Aborted {
                rank: self.rank,
                reason: e.to_string(),
            }),
        }
    }

    /// Waits up to `limit` for a rank to be lost, checking every `every`; returns the error as
    /// soon as there is one, or Ok when the time is up with every rank still there.
    pub fn hold(&self, limit: Duration, every: Duration) -> Result<(), RendezvousError> {
        let end = Instant::now() + limit;
        loop {
            self.check()?;
            if Instant::now() >= end {
                return Ok(());
            }
            std::thread::sleep(every.min(end.saturating_duration_since(Instant::now())));
        }
    }
}

impl Drop for Watch {
    /// Says goodbye on this rank's connections and closes them: the others see that it
    /// finished, where a process that dies only closes its end.
    fn drop(&mut self) {
        self.closing.store(true, Ordering::SeqCst);
        let mut senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        for (_, s) in senders.iter_mut() {
            let _ = send(s, b'D', &[]);
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Peer, RendezvousError};
    use std::collections::HashMap;
    use std::time::Duration;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn torchrun_variables_are_read_and_checked() {
        let t = Duration::from_secs(5);
        assert_eq!(Peer::from_vars(vars(&[]), t).unwrap(), None);
        let ok = vars(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
        ]);
        let peer = Peer::from_vars(ok, t).unwrap().unwrap();
        assert_eq!(
            (peer.rank, peer.local_rank, peer.world, peer.addr.as_str()),
            (3, 3, 4, "10.0.0.1:29500")
        );
        let with_local = vars(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
        ]);
        assert_eq!(Peer::from_vars(with_local, t).unwrap().unwrap().local_rank, 1);
        for (bad, name) in [
            (
                vec![("WORLD_SIZE", "4"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")],
                "RANK",
            ),
            (
                vec![
                    ("WORLD_SIZE", "4"),
                    ("RANK", "4"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "1"),
                ],
                "RANK",
            ),
            (
                vec![
                    ("WORLD_SIZE", "two"),
                    ("RANK", "0"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "1"),
                ],
                "WORLD_SIZE",
            ),
            (
                vec![("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "1")],
                "MASTER_ADDR",
            ),
            (
                vec![
                    ("WORLD_SIZE", "2"),
                    ("RANK", "0"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "70000"),
                ],
                "MASTER_PORT",
            ),
        ] {
            match Peer::from_vars(vars(&bad), t) {
                Err(RendezvousError::Env { name: n, .. }) => assert_eq!(n, name, "{bad:?}"),
                other => panic!(
                    "{bad:?}: expected an error about {name}, got {:?}",
                    other.map(|_| ())
                ),
            }
        }
    }

    fn free_port() -> u16 {
        super::free_local_port().unwrap()
    }

    /// The error of a rendezvous that must fail.
    fn error_of(peer: Peer) -> String {
        peer.join(|| vec![1])
            .err()
            .expect("the rendezvous must fail")
            .to_string()
    }

    fn peer(rank: usize, world: usize, port: u16, timeout_ms: u64) -> Peer {
        Peer {
            rank,
            local_rank: rank,
            world,
            addr: format!("127.0.0.1:{port}"),
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    #[test]
    fn ranks_in_threads_agree_on_the_id_and_a_finished_rank_is_no_error() {
        let port = free_port();
        let world = 4;
        let handles: Vec<_> = (0..world)
            .map(|r| std::thread::spawn(move || peer(r, world, port, 10_000).join(|| b"the id".to_vec())))
            .collect();
        let mut watches: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap().watch())
            .collect();
        assert!(watches.iter().all(|w| w.id == b"the id"));
        assert!(watches.iter().all(|w| w.check().is_ok()));
        // A rank that finishes says goodbye: the others carry on (a killed one is in
        // tests/rendezvous_processes.rs).
        drop(watches.remove(2));
        for w in &watches {
            w.hold(Duration::from_millis(300), Duration::from_millis(10))
                .unwrap();
        }
    }

    #[test]
    fn a_rank_that_never_arrives_is_named_on_every_rank_that_did() {
        let port = free_port();
        let handles: Vec<_> = [0, 2]
            .into_iter()
            .map(|r| std::thread::spawn(move || peer(r, 3, port, 500).join(|| vec![1])))
            .collect();
        for h in handles {
            let err = h
                .join()
                .unwrap()
                .err()
                .expect("the rendezvous must fail")
                .to_string();
            assert!(err.contains("rank(s) 1 of 3 did not arrive"), "{err}");
        }
    }

    #[test]
    fn a_world_size_mismatch_and_a_repeated_rank_are_errors() {
        let port = free_port();
        let zero = std::thread::spawn(move || peer(0, 3, port, 5_000).join(|| vec![1]));
        let other = error_of(peer(1, 2, port, 5_000));
        assert!(other.contains("says the world has 2 ranks"), "{other}");
        assert!(zero
            .join()
            .unwrap()
            .err()
            .unwrap()
            .to_string()
            .contains("WORLD_SIZE 3"));

        let port = free_port();
        let zero = std::thread::spawn(move || peer(0, 3, port, 5_000).join(|| vec![1]));
        let first = std::thread::spawn(move || peer(1, 3, port, 5_000).join(|| vec![1]));
        std::thread::sleep(Duration::from_millis(300));
        let second = error_of(peer(1, 3, port, 5_000));
        assert!(second.contains("rank 1 arrived twice"), "{second}");
        assert!(zero.join().unwrap().is_err());
        assert!(first.join().unwrap().is_err());
    }

    #[test]
    fn rank_zero_out_of_reach_is_an_error_naming_the_address() {
        let port = free_port();
        let err = error_of(peer(1, 2, port, 300));
        assert!(
            err.contains(&format!("127.0.0.1:{port} was not reachable")),
            "{err}"
        );
    }
}
