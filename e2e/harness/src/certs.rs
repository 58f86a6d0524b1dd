//! Certificates and keys for one control plane, made with `rcgen` (pure Rust,
//! ECDSA P-256): a CA, the apiserver's serving certificate for 127.0.0.1 and
//! localhost, an admin client certificate in group `system:masters`, the
//! client certificate of the test node's kubelet (`system:node:<name>` in
//! `system:nodes`, what the Node authorizer expects), and the service-account
//! signing key pair.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

use crate::error::{Error, Result};

/// Where [`write_all`] put the files.
#[derive(Debug, Clone)]
pub(crate) struct CertFiles {
    pub(crate) ca_cert: PathBuf,
    pub(crate) serving_cert: PathBuf,
    pub(crate) serving_key: PathBuf,
    pub(crate) admin_cert: PathBuf,
    pub(crate) admin_key: PathBuf,
    pub(crate) node_cert: PathBuf,
    pub(crate) node_key: PathBuf,
    pub(crate) sa_key: PathBuf,
    pub(crate) sa_pub: PathBuf,
}

/// The name of the real node a control plane can have (one per control plane).
pub const NODE_NAME: &str = "ckpt-node";

fn cert_err(what: &str) -> impl FnOnce(rcgen::Error) -> Error + '_ {
    move |source| Error::Certificate {
        what: what.to_string(),
        source,
    }
}

fn name(common_name: &str, organization: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    if let Some(o) = organization {
        dn.push(DnType::OrganizationName, o);
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Generates every certificate and key into `dir`.
pub(crate) fn write_all(dir: &Path) -> Result<CertFiles> {
    let write = |file: &str, text: &str| -> Result<PathBuf> {
        let path = dir.join(file);
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        Ok(path)
    };

    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err("CA"))?;
    ca_params.distinguished_name = name("ckpt-testcluster-ca", None);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().map_err(cert_err("CA key"))?;
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(cert_err("CA"))?;

    let leaf = |what: &'static str,
                sans: Vec<String>,
                dn: DistinguishedName,
                usage: ExtendedKeyUsagePurpose|
     -> Result<(String, String)> {
        let mut params = CertificateParams::new(sans).map_err(cert_err(what))?;
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(cert_err(what))?;
        let cert = params.signed_by(&key, &ca).map_err(cert_err(what))?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (serving_pem, serving_key_pem) = leaf(
        "apiserver serving certificate",
        vec!["127.0.0.1".into(), "localhost".into()],
        name("kube-apiserver", None),
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (admin_pem, admin_key_pem) = leaf(
        "admin client certificate",
        vec![],
        name("admin", Some("system:masters")),
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let (node_pem, node_key_pem) = leaf(
        "kubelet client certificate",
        vec![],
        name(&format!("system:node:{NODE_NAME}"), Some("system:nodes")),
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let sa = KeyPair::generate().map_err(cert_err("service-account key"))?;

    Ok(CertFiles {
        ca_cert: write("ca.crt", &ca.pem())?,
        serving_cert: write("apiserver.crt", &serving_pem)?,
        serving_key: write("apiserver.key", &serving_key_pem)?,
        admin_cert: write("admin.crt", &admin_pem)?,
        admin_key: write("admin.key", &admin_key_pem)?,
        node_cert: write("node.crt", &node_pem)?,
        node_key: write("node.key", &node_key_pem)?,
        sa_key: write("sa.key", &sa.serialize_pem())?,
        sa_pub: write("sa.pub", &sa.public_key_pem())?,
    })
}
