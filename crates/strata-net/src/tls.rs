//! Certificates and TLS configuration: a cluster CA, node certificates it signs, and
//! rustls configurations that make every connection mutually authenticated.
//!
//! Layout of a certificate directory: `ca.pem` (the CA certificate, shared by every
//! node), `ca.key` (the CA key, needed only to issue certificates: keep it off nodes),
//! and `<node>.pem` / `<node>.key` per node. A node certificate names the node (DNS SAN)
//! and carries [`CLUSTER_SERVER_NAME`], the name clients verify servers against; the
//! peer's own name is then checked against the certificate after the handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::NetError;

/// The server name every node certificate carries and clients verify.
pub const CLUSTER_SERVER_NAME: &str = "strata-node";
/// The ALPN protocol of Strata connections.
pub const ALPN: &[u8] = b"strata/1";
/// File name of the CA certificate.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA key.
pub const CA_KEY_FILE: &str = "ca.key";

fn cert_err(what: impl std::fmt::Display) -> NetError {
    NetError::Certificate(what.to_string())
}

/// Paths of a node's certificate and key in `dir`.
pub fn node_files(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")))
}

fn write_private(path: &Path, contents: &str) -> Result<(), NetError> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).map_err(|e| cert_err(format!("creating {}: {e}", path.display())))?;
    f.write_all(contents.as_bytes()).map_err(|e| cert_err(format!("writing {}: {e}", path.display())))
}

fn write_public(path: &Path, contents: &str) -> Result<(), NetError> {
    if path.exists() {
        return Err(cert_err(format!("{} already exists; not overwriting", path.display())));
    }
    std::fs::write(path, contents).map_err(|e| cert_err(format!("writing {}: {e}", path.display())))
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(days);
}

/// Creates a cluster CA in `dir` (`ca.pem`, `ca.key`); refuses to overwrite one.
pub fn create_ca(dir: &Path, cluster: &str) -> Result<(), NetError> {
    std::fs::create_dir_all(dir).map_err(|e| cert_err(format!("creating {}: {e}", dir.display())))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, format!("strata cluster CA {cluster}"));
    params.distinguished_name.push(DnType::OrganizationName, "strata");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, 3650);
    let key = KeyPair::generate().map_err(cert_err)?;
    let cert = params.self_signed(&key).map_err(cert_err)?;
    write_public(&dir.join(CA_CERT_FILE), &cert.pem())?;
    write_private(&dir.join(CA_KEY_FILE), &key.serialize_pem())
}

/// Issues a certificate for node `name`, signed by the CA in `dir`; `extra_names` are
/// added as subject alternative names (host names or IP addresses).
pub fn issue_node(dir: &Path, name: &str, extra_names: &[String]) -> Result<(), NetError> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
        return Err(cert_err(format!("node name {name:?} must be letters, digits, '-' and '.'")));
    }
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f)).map_err(|e| cert_err(format!("reading {}: {e}", dir.join(f).display())))
    };
    let ca_key = KeyPair::from_pem(&read(CA_KEY_FILE)?).map_err(|e| cert_err(format!("parsing {CA_KEY_FILE}: {e}")))?;
    let issuer = Issuer::from_ca_cert_pem(&read(CA_CERT_FILE)?, ca_key)
        .map_err(|e| cert_err(format!("parsing {CA_CERT_FILE}: {e}")))?;
    let mut sans = vec![name.to_string(), CLUSTER_SERVER_NAME.to_string()];
    sans.extend(extra_names.iter().cloned());
    let mut params = CertificateParams::new(sans).map_err(cert_err)?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    validity(&mut params, 825);
    let key = KeyPair::generate().map_err(cert_err)?;
    let cert = params.signed_by(&key, &issuer).map_err(cert_err)?;
    let (cert_path, key_path) = node_files(dir, name);
    write_public(&cert_path, &cert.pem())?;
    write_private(&key_path, &key.serialize_pem())
}

/// A node's TLS identity: the cluster CA it trusts and its own certificate and key.
#[derive(Debug)]
pub struct Identity {
    /// The node's name, as in its certificate.
    pub name: String,
    /// The cluster CA certificate.
    pub ca: CertificateDer<'static>,
    /// The node's certificate chain.
    pub chain: Vec<CertificateDer<'static>>,
    /// The node's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// A root store holding only the cluster CA.
    fn roots(&self) -> Result<rustls::RootCertStore, NetError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).map_err(cert_err)?;
        Ok(roots)
    }
}

/// Loads `ca.pem`, `<name>.pem` and `<name>.key` from `dir`.
pub fn load_identity(dir: &Path, name: &str) -> Result<Identity, NetError> {
    let ca_path = dir.join(CA_CERT_FILE);
    let (cert_path, key_path) = node_files(dir, name);
    let ca =
        CertificateDer::from_pem_file(&ca_path).map_err(|e| cert_err(format!("reading {}: {e}", ca_path.display())))?;
    let chain = CertificateDer::pem_file_iter(&cert_path)
        .map_err(|e| cert_err(format!("reading {}: {e}", cert_path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(format!("parsing {}: {e}", cert_path.display())))?;
    if chain.is_empty() {
        return Err(cert_err(format!("{} holds no certificate", cert_path.display())));
    }
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| cert_err(format!("reading {}: {e}", key_path.display())))?;
    verify_name(&chain[0], name).map_err(|e| cert_err(format!("{}: {e}", cert_path.display())))?;
    Ok(Identity { name: name.to_string(), ca, chain, key })
}

/// Checks that `cert` is valid for DNS name `name`.
pub fn verify_name(cert: &CertificateDer<'_>, name: &str) -> Result<(), String> {
    let ee = webpki::EndEntityCert::try_from(cert).map_err(|e| format!("unparsable certificate: {e}"))?;
    let sn = ServerName::try_from(name.to_string()).map_err(|e| format!("{name:?} is not a valid name: {e}"))?;
    ee.verify_is_valid_for_subject_name(&sn).map_err(|_| format!("certificate is not issued to {name:?}"))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let mut p = rustls::crypto::ring::default_provider();
    // AES-128-GCM first: as secure for this purpose and about a third cheaper per byte
    // than AES-256, and on a 2-core machine every encrypted byte costs CPU.
    p.cipher_suites = vec![TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256];
    Arc::new(p)
}

/// TLS for the accepting side: require a client certificate signed by the cluster CA.
/// With no identity (`--insecure-dev`) a throwaway certificate is used and clients are
/// not verified.
pub fn server_crypto(identity: Option<&Identity>) -> Result<rustls::ServerConfig, NetError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cert_err)?;
    let mut cfg = match identity {
        Some(id) => {
            let roots = id.roots()?;
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(cert_err)?;
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(id.chain.clone(), id.key.clone_key())
                .map_err(cert_err)?
        }
        None => {
            let (chain, key) = throwaway_cert()?;
            builder.with_no_client_auth().with_single_cert(chain, key).map_err(cert_err)?
        }
    };
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.max_early_data_size = 0;
    Ok(cfg)
}

/// TLS for the dialing side: verify the server against the cluster CA and present our
/// certificate. With no identity (`--insecure-dev`) any server is accepted.
pub fn client_crypto(identity: Option<&Identity>) -> Result<rustls::ClientConfig, NetError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cert_err)?;
    let mut cfg = match identity {
        Some(id) => {
            let roots = id.roots()?;
            builder
                .with_root_certificates(roots)
                .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
                .map_err(cert_err)?
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider())))
            .with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

fn throwaway_cert() -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), NetError> {
    let key = KeyPair::generate().map_err(cert_err)?;
    let cert = CertificateParams::new(vec![CLUSTER_SERVER_NAME.to_string()])
        .map_err(cert_err)?
        .self_signed(&key)
        .map_err(cert_err)?;
    let key = PrivateKeyDer::try_from(key.serialize_der()).map_err(cert_err)?;
    Ok((vec![cert.der().clone()], key))
}

/// Accepts any server certificate: only for `--insecure-dev`.
#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_and_node_certificates_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        create_ca(dir.path(), "test").unwrap();
        assert!(create_ca(dir.path(), "test").unwrap_err().to_string().contains("already exists"));
        issue_node(dir.path(), "node-1", &["127.0.0.1".into()]).unwrap();
        let id = load_identity(dir.path(), "node-1").unwrap();
        assert!(verify_name(&id.chain[0], "node-1").is_ok());
        assert!(verify_name(&id.chain[0], CLUSTER_SERVER_NAME).is_ok());
        assert_eq!(verify_name(&id.chain[0], "node-2").unwrap_err(), "certificate is not issued to \"node-2\"");
        assert!(server_crypto(Some(&id)).is_ok() && client_crypto(Some(&id)).is_ok());
        assert!(issue_node(dir.path(), "bad name", &[]).is_err());
        let e = load_identity(dir.path(), "node-9").unwrap_err();
        assert!(e.to_string().contains("node-9.pem"), "{e}");
    }
}
