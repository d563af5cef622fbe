//! The collectives of ranks that are separate processes (`train --nproc-per-node`, or several
//! machines in torchrun's convention), carried on the rendezvous connections: every rank sends
//! its buffer to rank 0, which sends every rank all buffers in rank order. Sums are then taken
//! locally in rank order, exactly as [`crate::collective::ThreadGroup`] takes them, so a run on
//! processes repeats a run on threads bit for bit.
//!
//! A rank whose process dies closes its connection: the rank that reads from it names it, and
//! rank 0 tells every other rank why the run stops. A rank that sends nothing within the timeout
//! is named the same way. Messages: `G`, a little-endian u64 count and that many f32 (a rank's
//! buffer); `R`, a u32 count of buffers and each as after `G` (rank 0's answer); `A`, a u32
//! length and the reason (rank 0 aborts the run).

use crate::collective::{Collective, CollectiveError};
use crate::rendezvous::{abort_all, read_payload, read_tag, Rendezvous, RendezvousError};
use std::io::{BufReader, BufWriter, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The longest buffer accepted, in f32 (16 GiB): a guard against a corrupt length.
const MAX_FLOATS: u64 = 1 << 32;

/// One rank of a group of processes.
pub struct ProcessGroup {
    rank: usize,
    world: usize,
    /// Rank 0: a connection to every other rank, in rank order; the others: one to rank 0.
    links: Mutex<Vec<(usize, TcpStream)>>,
    timeout: Duration,
    /// The id rank 0 handed out at the rendezvous (NCCL's unique id on GPUs, else empty).
    id: Vec<u8>,
}

impl ProcessGroup {
    /// The group of the ranks that met at `rendezvous`; a collective call fails when a rank
    /// it waits for sends nothing for `timeout`.
    pub fn new(rendezvous: Rendezvous, timeout: Duration) -> Result<Self, CollectiveError> {
        let (rank, world, id) = (rendezvous.rank, rendezvous.world, rendezvous.id.clone());
        let links = rendezvous.into_links();
        for (peer, stream) in &links {
            stream
                .set_read_timeout(Some(timeout))
                .and_then(|()| stream.set_nodelay(true))
                .map_err(|e| RendezvousError::lost(*peer, rank, &e))?;
        }
        Ok(ProcessGroup {
            rank,
            world,
            links: Mutex::new(links),
            timeout,
            id,
        })
    }

    /// The id rank 0 handed out at the rendezvous (NCCL's unique id on GPUs, else empty).
    pub fn id(&self) -> &[u8] {
        &self.id
    }

    /// The error for a failed read or write on the link to `peer`.
    fn failure(&self, peer: usize, e: &std::io::Error) -> CollectiveError {
        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
            RendezvousError::Silent {
                rank: peer,
                seen_by: self.rank,
                waited: self.timeout,
            }
        } else {
            RendezvousError::lost(peer, self.rank, e)
        }
    }
}

/// Writes a count and the f32 values, little-endian.
fn write_floats(out: &mut impl Write, values: &[f32]) -> std::io::Result<()> {
    out.write_all(&(values.len() as u64).to_le_bytes())?;
    for v in values {
        out.write_all(&v.to_le_bytes())?;
    }
    Ok(())
}

/// Reads what [`write_floats`] wrote.
fn read_floats(input: &mut impl Read) -> std::io::Result<Vec<f32>> {
    let mut word = [0u8; 8];
    input.read_exact(&mut word)?;
    let n = u64::from_le_bytes(word);
    if n > MAX_FLOATS {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("a buffer of {n} values"),
        ));
    }
    let mut bytes = vec![0u8; n as usize * 4];
    input.read_exact(&mut bytes)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

impl Collective for ProcessGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_gather(&self, local: Vec<f32>) -> Result<Vec<Arc<Vec<f32>>>, CollectiveError> {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if self.rank != 0 {
            let (_, stream) = &mut links[0];
            let sent = {
                let mut out = BufWriter::new(&mut *stream);
                out.write_all(b"G")
                    .and_then(|()| write_floats(&mut out, &local))
                    .and_then(|()| out.flush())
            };
            sent.map_err(|e| self.failure(0, &e))?;
            let mut input = BufReader::new(&mut *stream);
            let answer = (|| -> std::io::Result<Result<Vec<Arc<Vec<f32>>>, String>> {
                match read_tag(&mut input)? {
                    b'R' => {
                        let mut count = [0u8; 4];
                        input.read_exact(&mut count)?;
                        let all = (0..u32::from_le_bytes(count))
                            .map(|_| read_floats(&mut input).map(Arc::new))
                            .collect::<std::io::Result<Vec<_>>>()?;
                        Ok(Ok(all))
                    }
                    b'A' => {
                        let reason = read_payload(&mut input)?;
                        Ok(Err(String::from_utf8_lossy(&reason).into_owned()))
                    }
                    tag => Ok(Err(format!("rank 0 sent an unknown message '{}'", tag as char))),
                }
            })();
            return match answer {
                Ok(Ok(all)) if all.len() == self.world => Ok(all),
                Ok(Ok(all)) => Err(RendezvousError::Aborted {
                    rank: self.rank,
                    reason: format!("rank 0 sent {} buffers for {} ranks", all.len(), self.world),
                }),
                Ok(Err(reason)) => Err(RendezvousError::Aborted {
                    rank: self.rank,
                    reason,
                }),
                Err(e) => Err(self.failure(0, &e)),
            };
        }
        let mut all = Vec::with_capacity(self.world);
        all.push(Arc::new(local));
        let mut failed = None;
        for (peer, stream) in links.iter_mut() {
            let mut input = BufReader::new(&mut *stream);
            let got = match read_tag(&mut input) {
                Ok(b'G') => read_floats(&mut input),
                Ok(tag) => Err(std::io::Error::new(
                    ErrorKind::InvalidData,
                    format!("an unexpected message '{}' instead of a buffer", tag as char),
                )),
                Err(e) => Err(e),
            };
            match got {
                Ok(buf) => all.push(Arc::new(buf)),
                Err(e) => {
                    failed = Some(self.failure(*peer, &e));
                    break;
                }
            }
        }
        if let Some(err) = failed {
            abort_all(links.iter_mut().map(|(_, stream)| stream), &err.to_string());
            return Err(err);
        }
        for (peer, stream) in links.iter_mut() {
            let mut out = BufWriter::new(&mut *stream);
            let sent = out
                .write_all(b"R")
                .and_then(|()| out.write_all(&(all.len() as u32).to_le_bytes()))
                .and_then(|()| all.iter().try_for_each(|buf| write_floats(&mut out, buf)))
                .and_then(|()| out.flush());
            sent.map_err(|e| self.failure(*peer, &e))?;
        }
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::ProcessGroup;
    use crate::collective::Collective;
    use crate::rendezvous::{free_local_port, Peer, RendezvousError};
    use std::time::Duration;

    /// `world` ranks of a process group on this machine, each on its own thread, running `f`.
    fn run_ranks<T: Send>(world: usize, timeout: Duration, f: impl Fn(ProcessGroup) -> T + Sync) -> Vec<T> {
        let port = free_local_port().unwrap();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    let f = &f;
                    s.spawn(move || {
                        let peer = Peer {
                            rank,
                            local_rank: rank,
                            world,
                            addr: format!("127.0.0.1:{port}"),
                            timeout: Duration::from_secs(20),
                        };
                        f(ProcessGroup::new(peer.join(Vec::new).unwrap(), timeout).unwrap())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn ranks_gather_sum_and_broadcast_like_threads() {
        let results = run_ranks(3, Duration::from_secs(20), |g| {
            let r = g.rank() as f32;
            let mut data = vec![r, 10.0 * r, 1.0, f32::MIN_POSITIVE * r];
            g.all_reduce_sum(&mut data).unwrap();
            let sums = g.sum_f64(&[0.1 * g.rank() as f64, 1e-17]).unwrap();
            let lens: Vec<usize> = g
                .all_gather(vec![0.5; g.rank() * 1000])
                .unwrap()
                .iter()
                .map(|b| b.len())
                .collect();
            let mut shared = vec![r; 2];
            g.broadcast(&mut shared).unwrap();
            g.barrier().unwrap();
            (data, sums, lens, shared)
        });
        for (data, sums, lens, shared) in results {
            assert_eq!(data, vec![3.0, 30.0, 3.0, f32::MIN_POSITIVE * 3.0]);
            assert_eq!(sums, vec![0.0 + 0.1 + 0.2, 3e-17]);
            assert_eq!(lens, vec![0, 1000, 2000]);
            assert_eq!(shared, vec![0.0, 0.0]);
        }
    }

    #[test]
    fn a_rank_that_leaves_is_named_on_every_other_rank() {
        let results = run_ranks(3, Duration::from_secs(20), |g| {
            g.barrier().unwrap();
            if g.rank() == 2 {
                return None; // drops its connection, as a dying process would
            }
            Some(g.barrier().unwrap_err())
        });
        for err in results.into_iter().flatten() {
            let text = err.to_string();
            assert!(text.contains("rank 2"), "{text}");
        }
    }

    #[test]
    fn a_silent_rank_is_named_after_the_timeout() {
        let results = run_ranks(2, Duration::from_millis(300), |g| {
            if g.rank() == 1 {
                std::thread::sleep(Duration::from_secs(2));
                return None;
            }
            Some(g.barrier().unwrap_err())
        });
        let err = results[0].as_ref().unwrap();
        assert!(
            matches!(
                err,
                RendezvousError::Silent {
                    rank: 1,
                    seen_by: 0,
                    ..
                }
            ),
            "{err}"
        );
    }
}
