//! QUIC endpoint construction and transport tuning.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use crate::NetError;
use crate::config::NodeConfig;
use crate::tls::{self, Identity};

/// Largest UDP payload over IPv4.
const UDP_PAYLOAD_MAX: u16 = 65507;

/// Streams a peer may have open towards this node at once. With at most a header's worth
/// of undecoded bytes each (64 KiB), this bounds what stream bookkeeping can hold; the
/// collectives keep 8 sends in flight per operation.
const UNI_STREAMS_MAX: u32 = 256;
const BIDI_STREAMS_MAX: u32 = 64;

fn transport(config: &NodeConfig, large_datagrams: bool) -> Result<quinn::TransportConfig, NetError> {
    let mut t = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(config.failure_timeout()).map_err(|_| {
        NetError::Config(format!("failure timeout of {} ms is too large for QUIC", config.failure_timeout_ms))
    })?;
    t.max_idle_timeout(Some(idle));
    t.keep_alive_interval(Some(config.heartbeat()));
    t.max_concurrent_uni_streams(UNI_STREAMS_MAX.into());
    t.max_concurrent_bidi_streams(BIDI_STREAMS_MAX.into());
    t.stream_receive_window((16u32 << 20).into());
    t.receive_window((64u32 << 20).into());
    t.send_window(64 << 20);
    if std::env::var("STRATA_QUIC_CC").as_deref() == Ok("bbr") {
        t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    }
    if let Some(us) = std::env::var("STRATA_ACK_DELAY_US").ok().and_then(|v| v.parse::<u64>().ok()) {
        let mut ack = quinn::AckFrequencyConfig::default();
        ack.max_ack_delay(Some(Duration::from_micros(us)));
        t.ack_frequency_config(Some(ack));
    }
    if large_datagrams {
        // On loopback a large segment size makes quinn's batched sendmsg exceed the UDP
        // payload limit when segmentation offload is on; with it off, MTU discovery
        // climbs to 65507 and one stream moves about 3x more data (PLATFORM.md).
        t.enable_segmentation_offload(false);
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(UDP_PAYLOAD_MAX);
        t.mtu_discovery_config(Some(mtu));
    }
    Ok(t)
}

/// Whether to use large datagrams for this listen address.
pub(crate) fn large_datagrams(config: &NodeConfig, listen: &SocketAddr) -> bool {
    config.large_datagrams.unwrap_or_else(|| listen.ip().is_loopback())
}

/// Binds the UDP socket and creates the endpoint; must run inside a tokio runtime.
pub(crate) fn bind(
    config: &NodeConfig,
    identity: Option<&Identity>,
) -> Result<(quinn::Endpoint, quinn::ClientConfig), NetError> {
    let listen = config.listen_addr()?;
    let ep_err = |reason: String| NetError::Endpoint { addr: listen.to_string(), reason };
    let large = large_datagrams(config, &listen);
    let transport = Arc::new(transport(config, large)?);

    let server_tls = tls::server_crypto(identity)?;
    let server_quic = QuicServerConfig::try_from(server_tls).map_err(|e| NetError::Certificate(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_quic));
    server.transport_config(transport.clone());

    let client_tls = tls::client_crypto(identity)?;
    let client_quic = QuicClientConfig::try_from(client_tls).map_err(|e| NetError::Certificate(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client_quic));
    client.transport_config(transport);

    let socket = udp_socket(listen, config.socket_buffer_bytes).map_err(|e| ep_err(e.to_string()))?;
    let mut ep_config = quinn::EndpointConfig::default();
    if large {
        ep_config.max_udp_payload_size(UDP_PAYLOAD_MAX).map_err(|e| ep_err(e.to_string()))?;
    }
    let runtime = quinn::default_runtime().ok_or_else(|| ep_err("no async runtime found".into()))?;
    let endpoint = quinn::Endpoint::new(ep_config, Some(server), socket, runtime).map_err(|e| ep_err(e.to_string()))?;
    Ok((endpoint, client))
}

/// A client-only endpoint (status tools).
pub(crate) fn client_endpoint(
    config: &NodeConfig,
    identity: Option<&Identity>,
) -> Result<(quinn::Endpoint, quinn::ClientConfig), NetError> {
    let any: SocketAddr = "0.0.0.0:0".parse().expect("literal address");
    let mut t = transport(config, false)?;
    t.keep_alive_interval(Some(Duration::from_millis(config.heartbeat_ms)));
    let client_tls = tls::client_crypto(identity)?;
    let client_quic = QuicClientConfig::try_from(client_tls).map_err(|e| NetError::Certificate(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client_quic));
    client.transport_config(Arc::new(t));
    let endpoint = quinn::Endpoint::client(any)
        .map_err(|e| NetError::Endpoint { addr: any.to_string(), reason: e.to_string() })?;
    Ok((endpoint, client))
}

fn udp_socket(addr: SocketAddr, buffer_bytes: usize) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Larger socket buffers remove packet loss at high rates. The kernel caps SO_RCVBUF at
    // net.core.rmem_max; with CAP_NET_ADMIN the FORCE variants lift the cap.
    let _ = socket.set_recv_buffer_size(buffer_bytes);
    let _ = socket.set_send_buffer_size(buffer_bytes);
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let size = libc::c_int::try_from(buffer_bytes).unwrap_or(libc::c_int::MAX);
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
            // SAFETY: a valid socket descriptor and a correctly sized option value.
            let _ = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}
