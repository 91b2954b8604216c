//! Node configuration: defaults, a TOML file, torchrun-style environment variables.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use strata_wire::Limits;

use crate::NetError;

/// Everything a node needs to start. Every field has a default; see [`NodeConfig::validate`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Unique node name; must match the node's certificate.
    pub name: String,
    /// Cluster name; nodes of different clusters refuse each other.
    pub cluster: String,
    /// UDP address to listen on (`127.0.0.1:0` picks a free port).
    pub listen: String,
    /// Address other nodes dial, when it differs from the bound address.
    pub advertise: Option<String>,
    /// Static peer addresses to dial.
    pub peers: Vec<String>,
    /// A member to join through.
    pub seed: Option<String>,
    /// Directory with `ca.pem`, `<name>.pem`, `<name>.key`.
    pub cert_dir: Option<PathBuf>,
    /// No certificate checks at all (development only; the node warns loudly).
    pub insecure_dev: bool,
    /// Launcher rank (torchrun's `RANK`).
    pub rank: Option<u32>,
    /// Expected cluster size (torchrun's `WORLD_SIZE`).
    pub world_size: Option<u32>,
    /// Interval between heartbeats, ms.
    pub heartbeat_ms: u64,
    /// A member silent for this long is declared failed, ms (at most 5000 by default).
    pub failure_timeout_ms: u64,
    /// Limit on establishing a connection, ms.
    pub connect_timeout_ms: u64,
    /// Limit on a request's answer, ms.
    pub request_timeout_ms: u64,
    /// Largest frame header, bytes.
    pub header_bytes_max: u32,
    /// Largest frame payload, bytes.
    pub frame_bytes_max: u64,
    /// Large UDP datagrams (MTU up to 65507, segmentation offload off): `None` enables
    /// them on loopback only, where they triple throughput; real networks keep defaults.
    pub large_datagrams: Option<bool>,
    /// `SO_RCVBUF`/`SO_SNDBUF` of the UDP socket, bytes.
    pub socket_buffer_bytes: usize,
    /// Bytes one peer may make this node hold at once (frames being read, chunks waiting
    /// for their operation, tensors in mailboxes); a peer over it is disconnected.
    pub peer_buffer_bytes_max: u64,
    /// How long data for a collective operation that nobody here opened is kept, ms.
    pub early_chunk_ttl_ms: u64,
    /// Whether the QUIC endpoint (packet IO, encryption, stream reads) runs on a thread of
    /// its own, overlapping with the actors and the collectives' arithmetic (`Some(true)`),
    /// or on the node's thread (`Some(false)`), which saves a cross-thread wake-up per
    /// datagram. `None` (the default) gives it a thread when the machine has at least two
    /// cores per node process on it: the processes are counted by `LOCAL_WORLD_SIZE`, as
    /// torchrun-style launchers set it, else 1. See [`NodeConfig::io_thread_of_its_own`].
    pub io_thread: Option<bool>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            cluster: "strata".into(),
            listen: "127.0.0.1:0".into(),
            advertise: None,
            peers: Vec::new(),
            seed: None,
            cert_dir: None,
            insecure_dev: false,
            rank: None,
            world_size: None,
            heartbeat_ms: 500,
            failure_timeout_ms: 3000,
            connect_timeout_ms: 3000,
            request_timeout_ms: 30_000,
            header_bytes_max: Limits::default().header_bytes_max,
            frame_bytes_max: Limits::default().frame_bytes_max,
            large_datagrams: None,
            socket_buffer_bytes: 8 << 20,
            peer_buffer_bytes_max: (Limits::default().frame_bytes_max).saturating_mul(3) / 2,
            early_chunk_ttl_ms: 60_000,
            io_thread: None,
        }
    }
}

/// The longest heartbeat interval, failure timeout or request timeout a configuration may
/// set: one hour, in ms.
pub const DURATION_MS_MAX: u64 = 3_600_000;

fn cfg_err(m: impl Into<String>) -> NetError {
    NetError::Config(m.into())
}

impl NodeConfig {
    /// Whether the endpoint gets a thread of its own (see [`NodeConfig::io_thread`]).
    pub fn io_thread_of_its_own(&self) -> bool {
        self.io_thread.unwrap_or_else(|| {
            let processes =
                std::env::var("LOCAL_WORLD_SIZE").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(1).max(1);
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            cores >= 2 * processes
        })
    }

    /// Reads a TOML file whose keys are this struct's fields.
    pub fn from_toml_file(path: &Path) -> Result<Self, NetError> {
        let text = std::fs::read_to_string(path).map_err(|e| cfg_err(format!("reading {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| cfg_err(format!("{}: {e}", path.display())))
    }

    /// Applies torchrun's variables where set: `RANK` (rank and default name `rank-N`),
    /// `WORLD_SIZE`, and `MASTER_ADDR:MASTER_PORT` (rank 0 listens there, the others join
    /// through it).
    pub fn apply_torchrun_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), NetError> {
        let num = |k: &str| -> Result<Option<u32>, NetError> {
            get(k).map(|v| v.parse::<u32>().map_err(|e| cfg_err(format!("{k}={v:?}: {e}")))).transpose()
        };
        if let Some(rank) = num("RANK")? {
            self.rank = Some(rank);
            if self.name.is_empty() {
                self.name = format!("rank-{rank}");
            }
        }
        if let Some(w) = num("WORLD_SIZE")? {
            self.world_size = Some(w);
        }
        if let (Some(addr), Some(port)) = (get("MASTER_ADDR"), get("MASTER_PORT")) {
            let master = format!("{addr}:{port}");
            if self.rank == Some(0) {
                self.listen = master;
            } else if self.seed.is_none() {
                self.seed = Some(master);
            }
        }
        Ok(())
    }

    /// Checks the configuration and fills derived defaults.
    pub fn validate(&self) -> Result<(), NetError> {
        if self.name.is_empty() {
            return Err(cfg_err("a node name is required (--name, name = ..., or RANK)"));
        }
        self.listen_addr()?;
        if self.cert_dir.is_none() && !self.insecure_dev {
            return Err(cfg_err(
                "a certificate directory is required (--cert-dir; create one with `strata cert`), or --insecure-dev",
            ));
        }
        // Durations beyond an hour are mistakes (a misplaced unit), and the largest ones do
        // not fit QUIC's idle timeout or an `Instant` sum.
        for (what, ms) in [
            ("heartbeat interval", self.heartbeat_ms),
            ("failure timeout", self.failure_timeout_ms),
            ("connect timeout", self.connect_timeout_ms),
            ("request timeout", self.request_timeout_ms),
        ] {
            if ms > DURATION_MS_MAX {
                return Err(cfg_err(format!("{what} of {ms} ms exceeds the maximum of {DURATION_MS_MAX} ms (1 hour)")));
            }
            if ms == 0 {
                return Err(cfg_err(format!("{what} must be at least 1 ms")));
            }
        }
        if self.failure_timeout_ms <= self.heartbeat_ms {
            return Err(cfg_err(format!(
                "failure timeout ({} ms) must exceed the heartbeat interval ({} ms)",
                self.failure_timeout_ms, self.heartbeat_ms
            )));
        }
        if self.peer_buffer_bytes_max < self.frame_bytes_max {
            return Err(cfg_err(format!(
                "a peer's buffer budget ({} bytes) must hold one frame of the largest size ({} bytes)",
                self.peer_buffer_bytes_max, self.frame_bytes_max
            )));
        }
        if self.early_chunk_ttl_ms == 0 {
            return Err(cfg_err("early_chunk_ttl_ms must be positive"));
        }
        if let (Some(r), Some(w)) = (self.rank, self.world_size)
            && r >= w
        {
            return Err(cfg_err(format!("rank {r} is outside world size {w}")));
        }
        Ok(())
    }

    /// The listen address, parsed.
    pub fn listen_addr(&self) -> Result<SocketAddr, NetError> {
        self.listen.parse().map_err(|e| cfg_err(format!("listen address {:?}: {e}", self.listen)))
    }

    /// Frame limits.
    pub fn limits(&self) -> Limits {
        Limits { header_bytes_max: self.header_bytes_max, frame_bytes_max: self.frame_bytes_max }
    }

    /// Heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }

    /// Failure timeout.
    pub fn failure_timeout(&self) -> Duration {
        Duration::from_millis(self.failure_timeout_ms)
    }

    /// Request timeout: also the limit on every single wait of a send or a frame read.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torchrun_variables_set_rank_name_and_seed() {
        let env = |k: &str| match k {
            "RANK" => Some("2".to_string()),
            "WORLD_SIZE" => Some("4".to_string()),
            "MASTER_ADDR" => Some("127.0.0.1".to_string()),
            "MASTER_PORT" => Some("29500".to_string()),
            _ => None,
        };
        let mut c = NodeConfig { insecure_dev: true, ..Default::default() };
        c.apply_torchrun_env(env).unwrap();
        assert_eq!(
            (c.name.as_str(), c.rank, c.world_size, c.seed.as_deref()),
            ("rank-2", Some(2), Some(4), Some("127.0.0.1:29500"))
        );
        c.validate().unwrap();
        let mut c0 = NodeConfig::default();
        c0.apply_torchrun_env(|k| if k == "RANK" { Some("0".into()) } else { env(k) }).unwrap();
        assert_eq!(c0.listen, "127.0.0.1:29500");
        let bad = NodeConfig::default().apply_torchrun_env(|k| (k == "RANK").then(|| "x".to_string()));
        assert!(bad.unwrap_err().to_string().contains("RANK=\"x\""));
    }

    #[test]
    fn toml_and_validation() {
        let c: NodeConfig =
            toml::from_str("name = \"a\"\nlisten = \"127.0.0.1:7000\"\ninsecure_dev = true\nfailure_timeout_ms = 2000")
                .unwrap();
        c.validate().unwrap();
        assert!(toml::from_str::<NodeConfig>("nmae = \"a\"").is_err());
        let e = NodeConfig { name: "a".into(), ..Default::default() }.validate().unwrap_err();
        assert!(e.to_string().contains("certificate directory is required"));
        let e = NodeConfig { name: "a".into(), insecure_dev: true, failure_timeout_ms: 100, ..Default::default() }
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("must exceed the heartbeat interval"));
    }

    #[test]
    fn durations_are_capped_at_an_hour_and_must_not_be_zero() {
        let base = NodeConfig { name: "a".into(), insecure_dev: true, ..Default::default() };
        // u64::MAX ms does not fit a QUIC idle timeout; it used to reach an `expect`.
        let e = NodeConfig { failure_timeout_ms: u64::MAX, ..base.clone() }.validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "configuration: failure timeout of 18446744073709551615 ms exceeds the maximum of 3600000 ms (1 hour)"
        );
        let e = NodeConfig { request_timeout_ms: 3_600_001, ..base.clone() }.validate().unwrap_err();
        assert!(e.to_string().contains("request timeout of 3600001 ms exceeds the maximum"), "{e}");
        let e = NodeConfig { connect_timeout_ms: 0, ..base.clone() }.validate().unwrap_err();
        assert!(e.to_string().contains("connect timeout must be at least 1 ms"), "{e}");
        let e = NodeConfig { heartbeat_ms: u64::MAX, failure_timeout_ms: 1000, ..base.clone() }.validate().unwrap_err();
        assert!(e.to_string().contains("heartbeat interval of 18446744073709551615 ms exceeds"), "{e}");
        NodeConfig { heartbeat_ms: 60_000, failure_timeout_ms: DURATION_MS_MAX, ..base }.validate().unwrap();
    }
}
