//! Certificates and TLS configuration: a cluster CA, the certificates it signs, and
//! rustls configurations that make every connection mutually authenticated.
//!
//! Layout of a certificate directory: `ca.pem` (the CA certificate, shared by every
//! node), `ca.key` (the CA key, needed only to issue certificates: keep it off nodes),
//! and `<name>.pem` / `<name>.key` per node or operator.
//!
//! Every certificate carries exactly one Strata identity, a URI subject alternative name
//! `urn:strata:<role>:<name>`: the role ([`Role::Node`] or [`Role::Operator`]) and the one
//! name its holder may use. A node may claim only that name in its hello, whatever other
//! subject names (host names, IP addresses for TLS) the certificate carries; an operator
//! certificate can query and submit but never joins as a member, and a node certificate
//! is not an operator's. Servers are verified by the same identity (the chain against
//! the cluster CA, then the role), so no name is shared between certificates.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::NetError;

/// The TLS server name (SNI) sent when dialing. Certificates do not carry it: a server
/// is verified by its Strata identity, not by this name.
pub const CLUSTER_SERVER_NAME: &str = "strata-node";
/// The ALPN protocol of Strata connections.
pub const ALPN: &[u8] = b"strata/2";
/// File name of the CA certificate.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA key.
pub const CA_KEY_FILE: &str = "ca.key";
/// Prefix of the identity URI in every certificate.
const IDENTITY_PREFIX: &str = "urn:strata:";

/// What a certificate allows its holder to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// A cluster member: joins, gossips, runs collectives and tasks.
    Node,
    /// A tool or application client: queries status, submits and cancels work; never a member.
    Operator,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Operator => "operator",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn cert_err(what: impl std::fmt::Display) -> NetError {
    NetError::Certificate(what.to_string())
}

/// Paths of a node's (or operator's) certificate and key in `dir`.
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

/// Checks a node or operator name: letters, digits, '-' and '.', at most 63 bytes.
pub fn check_name(name: &str) -> Result<(), NetError> {
    if name.is_empty() || name.len() > 63 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
        return Err(cert_err(format!("name {name:?} must be 1 to 63 letters, digits, '-' and '.'")));
    }
    Ok(())
}

fn identity_uri(role: Role, name: &str) -> String {
    format!("{IDENTITY_PREFIX}{role}:{name}")
}

/// Issues a node certificate for `name`, signed by the CA in `dir`. `extra_names` (host
/// names or IP addresses) are added as subject alternative names of this certificate
/// only; they serve TLS and never let the holder claim another node's name.
pub fn issue_node(dir: &Path, name: &str, extra_names: &[String]) -> Result<(), NetError> {
    issue(dir, name, Role::Node, extra_names)
}

/// Issues an operator certificate for `name` (tools such as `strata status`, and
/// applications that submit work without joining as a member).
pub fn issue_operator(dir: &Path, name: &str) -> Result<(), NetError> {
    issue(dir, name, Role::Operator, &[])
}

fn issue(dir: &Path, name: &str, role: Role, extra_names: &[String]) -> Result<(), NetError> {
    check_name(name)?;
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f)).map_err(|e| cert_err(format!("reading {}: {e}", dir.join(f).display())))
    };
    let ca_key = KeyPair::from_pem(&read(CA_KEY_FILE)?).map_err(|e| cert_err(format!("parsing {CA_KEY_FILE}: {e}")))?;
    let issuer = Issuer::from_ca_cert_pem(&read(CA_CERT_FILE)?, ca_key)
        .map_err(|e| cert_err(format!("parsing {CA_CERT_FILE}: {e}")))?;
    let ia5 = |s: &str| {
        rcgen::string::Ia5String::try_from(s.to_string()).map_err(|e| cert_err(format!("subject name {s:?}: {e}")))
    };
    let mut params = CertificateParams::default();
    params.subject_alt_names.push(SanType::URI(ia5(&identity_uri(role, name))?));
    if role == Role::Node {
        // The node's own name as a DNS name: servers are verified against it.
        params.subject_alt_names.push(SanType::DnsName(ia5(name)?));
        for extra in extra_names {
            if extra == name {
                continue;
            }
            params.subject_alt_names.push(match extra.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(ia5(extra)?),
            });
        }
    } else if !extra_names.is_empty() {
        return Err(cert_err("operator certificates carry no extra subject names"));
    }
    params.distinguished_name.push(DnType::CommonName, name);
    params.distinguished_name.push(DnType::OrganizationalUnitName, role.as_str());
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match role {
        Role::Node => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        // An operator only ever dials.
        Role::Operator => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    validity(&mut params, 825);
    let key = KeyPair::generate().map_err(cert_err)?;
    let cert = params.signed_by(&key, &issuer).map_err(cert_err)?;
    let (cert_path, key_path) = node_files(dir, name);
    write_public(&cert_path, &cert.pem())?;
    write_private(&key_path, &key.serialize_pem())
}

/// The Strata identity a certificate carries: its role and its one name. Fails unless the
/// certificate holds exactly one `urn:strata:<role>:<name>` subject name (and, for a
/// node, the same name as a DNS name).
pub fn certificate_identity(cert: &CertificateDer<'_>) -> Result<(Role, String), String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, x509) = X509Certificate::from_der(cert.as_ref()).map_err(|e| format!("unparsable certificate: {e}"))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| format!("unparsable subject names: {e}"))?
        .ok_or("the certificate has no subject names (issue it with `strata cert`)")?;
    let mut ids = Vec::new();
    let mut dns = Vec::new();
    for n in &san.value.general_names {
        match n {
            GeneralName::URI(u) if u.starts_with(IDENTITY_PREFIX) => ids.push(*u),
            GeneralName::DNSName(d) => dns.push(*d),
            _ => {}
        }
    }
    let [id] = ids.as_slice() else {
        return Err(format!(
            "the certificate carries {} Strata identities, not one (issue it with `strata cert`)",
            ids.len()
        ));
    };
    let rest = &id[IDENTITY_PREFIX.len()..];
    let (role, name) = rest.split_once(':').ok_or_else(|| format!("malformed identity {id:?}"))?;
    let role = match role {
        "node" => Role::Node,
        "operator" => Role::Operator,
        other => return Err(format!("unknown role {other:?} in {id:?}")),
    };
    check_name(name).map_err(|e| e.to_string())?;
    if role == Role::Node && !dns.contains(&name) {
        return Err(format!("node certificate for {name:?} lacks its name as a DNS name"));
    }
    Ok((role, name.to_string()))
}

/// A TLS identity: the cluster CA it trusts and its own certificate and key.
#[derive(Debug)]
pub struct Identity {
    /// The holder's name, as in its certificate.
    pub name: String,
    /// What the certificate allows.
    pub role: Role,
    /// The cluster CA certificate.
    pub ca: CertificateDer<'static>,
    /// The certificate chain.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key.
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

/// Loads `ca.pem`, `<name>.pem` and `<name>.key` from `dir` and checks that the
/// certificate names `name` with role `role` (a node cannot start with an operator's
/// certificate, nor a tool with a node's).
pub fn load_identity(dir: &Path, name: &str, role: Role) -> Result<Identity, NetError> {
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
    let (got_role, got_name) =
        certificate_identity(&chain[0]).map_err(|e| cert_err(format!("{}: {e}", cert_path.display())))?;
    if got_name != name {
        return Err(cert_err(format!("{} is issued to {got_name:?}, not {name:?}", cert_path.display())));
    }
    if got_role != role {
        return Err(cert_err(format!(
            "{} is {} certificate; this needs {} certificate (issue one with `strata cert{}`)",
            cert_path.display(),
            article(got_role),
            article(role),
            if role == Role::Operator { " --operator NAME" } else { " NAME" }
        )));
    }
    Ok(Identity { name: name.to_string(), role, ca, chain, key })
}

fn article(role: Role) -> &'static str {
    match role {
        Role::Node => "a node",
        Role::Operator => "an operator",
    }
}

/// Checks that `cert` is a node certificate issued to `name`.
pub fn verify_name(cert: &CertificateDer<'_>, name: &str) -> Result<(), String> {
    verify_identity(cert, Role::Node, name)
}

/// Checks that `cert` carries exactly the identity `role` / `name`.
pub fn verify_identity(cert: &CertificateDer<'_>, role: Role, name: &str) -> Result<(), String> {
    let (got_role, got_name) = certificate_identity(cert)?;
    if got_role != role {
        return Err(format!("{} certificate cannot act as {}", article(got_role), article(role)));
    }
    if got_name != name {
        return Err(format!("certificate is issued to {got_name:?}, not {name:?}"));
    }
    Ok(())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    // aws-lc's AES-GCM uses the CPU's vector AES where it has it: on this project's
    // machines it seals and opens packets about twice as fast as ring (`benches/aead.rs`).
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
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
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(id.roots()?), provider())
                .build()
                .map_err(cert_err)?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NodeServerVerifier { inner }))
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

/// Verifies a server as a cluster node: the chain against the cluster CA (by rustls'
/// WebPKI verifier), then its Strata identity, which must have the node role; the DNS
/// name checked is the node's own name from that identity, so no shared server name is
/// needed. Which node it must be is checked against its hello.
#[derive(Debug)]
struct NodeServerVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
}

impl rustls::client::danger::ServerCertVerifier for NodeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let (role, name) = certificate_identity(end_entity).map_err(rustls::Error::General)?;
        if role != Role::Node {
            return Err(rustls::Error::General(format!("the server presents {} certificate", article(role))));
        }
        let sn = ServerName::try_from(name).map_err(|e| rustls::Error::General(e.to_string()))?;
        self.inner.verify_server_cert(end_entity, intermediates, &sn, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
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
    fn certificates_carry_one_role_and_one_name() {
        let dir = tempfile::tempdir().unwrap();
        create_ca(dir.path(), "test").unwrap();
        assert!(create_ca(dir.path(), "test").unwrap_err().to_string().contains("already exists"));
        issue_node(dir.path(), "node-1", &["127.0.0.1".into(), "host-a.example".into()]).unwrap();
        issue_node(dir.path(), "node-2", &[]).unwrap();
        issue_operator(dir.path(), "admin").unwrap();
        let id = load_identity(dir.path(), "node-1", Role::Node).unwrap();
        assert_eq!(certificate_identity(&id.chain[0]).unwrap(), (Role::Node, "node-1".to_string()));
        assert!(verify_name(&id.chain[0], "node-1").is_ok());
        // Neither the dial name nor an extra subject name is an identity.
        for other in [CLUSTER_SERVER_NAME, "node-2", "host-a.example", "127.0.0.1"] {
            assert_eq!(
                verify_name(&id.chain[0], other).unwrap_err(),
                format!("certificate is issued to \"node-1\", not {other:?}")
            );
        }
        assert!(server_crypto(Some(&id)).is_ok() && client_crypto(Some(&id)).is_ok());

        let op = load_identity(dir.path(), "admin", Role::Operator).unwrap();
        assert_eq!(certificate_identity(&op.chain[0]).unwrap(), (Role::Operator, "admin".to_string()));
        assert_eq!(verify_name(&op.chain[0], "admin").unwrap_err(), "an operator certificate cannot act as a node");
        let e = load_identity(dir.path(), "admin", Role::Node).unwrap_err().to_string();
        assert!(e.contains("is an operator certificate; this needs a node certificate"), "{e}");
        let e = load_identity(dir.path(), "node-2", Role::Operator).unwrap_err().to_string();
        assert!(e.contains("is a node certificate; this needs an operator certificate"), "{e}");

        assert!(issue_node(dir.path(), "bad name", &[]).is_err());
        assert!(issue_operator(dir.path(), &"x".repeat(64)).is_err());
        let e = load_identity(dir.path(), "node-9", Role::Node).unwrap_err();
        assert!(e.to_string().contains("node-9.pem"), "{e}");
        // A certificate renamed on disk is refused: the file name is not the identity.
        std::fs::copy(dir.path().join("node-1.pem"), dir.path().join("node-7.pem")).unwrap();
        std::fs::copy(dir.path().join("node-1.key"), dir.path().join("node-7.key")).unwrap();
        let e = load_identity(dir.path(), "node-7", Role::Node).unwrap_err().to_string();
        assert!(e.contains("is issued to \"node-1\", not \"node-7\""), "{e}");
    }

    #[test]
    fn certificates_without_exactly_one_identity_are_refused() {
        let key = KeyPair::generate().unwrap();
        let plain = CertificateParams::new(vec!["node-1".to_string()]).unwrap().self_signed(&key).unwrap();
        let e = certificate_identity(plain.der()).unwrap_err();
        assert!(e.contains("carries 0 Strata identities"), "{e}");
        let mut two = CertificateParams::new(vec!["node-1".to_string()]).unwrap();
        for n in ["node-1", "node-2"] {
            two.subject_alt_names.push(SanType::URI(identity_uri(Role::Node, n).try_into().unwrap()));
        }
        let e = certificate_identity(two.self_signed(&key).unwrap().der()).unwrap_err();
        assert!(e.contains("carries 2 Strata identities"), "{e}");
    }
}
