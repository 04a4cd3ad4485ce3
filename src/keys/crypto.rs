//! The gateway's master key and what it protects: institutions' own provider keys
//! (AES-256-GCM, RustCrypto `aes-gcm`) and the pseudonymous end-user ids sent to
//! providers (HMAC-SHA256).
//!
//! The master key comes from `TOKENTALLY_GATEWAY_MASTER_KEY` (64 hex characters) or
//! from `gateway.master_key_file`, which must be readable by its owner only. Every
//! gateway instance needs the same one; losing it makes stored provider keys unreadable
//! (set them again) and changes every pseudonymous id.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use crate::config::GatewayConfig;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("the master key must be 64 hex characters (32 bytes)")]
    BadMasterKey,
    #[error("master key file {0} is readable by others (mode {1:o}); run `chmod 600 {0}`")]
    OpenFile(String, u32),
    #[error("master key file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "no master key: set TOKENTALLY_GATEWAY_MASTER_KEY or create {0} (64 hex characters, mode 600)"
    )]
    Missing(String),
    #[error(
        "a stored provider key could not be decrypted (wrong master key, or the row was altered)"
    )]
    Decrypt,
}

/// 32 secret bytes. `Debug` never shows them.
#[derive(Clone)]
pub struct MasterKey([u8; 32]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

fn parse_hex_key(text: &str) -> Result<[u8; 32], CryptoError> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut key).map_err(|_| CryptoError::BadMasterKey)?;
    Ok(key)
}

impl MasterKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The configured master key. With `create`, a missing key file is created with a
    /// fresh random key (mode 600) — what a first start of a single gateway wants.
    pub fn load(cfg: &GatewayConfig, create: bool) -> Result<Self, CryptoError> {
        if !cfg.master_key.is_empty() {
            return parse_hex_key(cfg.master_key.expose()).map(Self);
        }
        let path = &cfg.master_key_file;
        let shown = path.display().to_string();
        match std::fs::metadata(path) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(CryptoError::OpenFile(shown, mode));
                }
                let text = std::fs::read_to_string(path).map_err(|source| CryptoError::Io {
                    path: shown.clone(),
                    source,
                })?;
                parse_hex_key(&text).map(Self)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => Self::create_file(path)
                .map_err(|source| CryptoError::Io {
                    path: shown,
                    source,
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(CryptoError::Missing(shown)),
            Err(source) => Err(CryptoError::Io {
                path: shown,
                source,
            }),
        }
    }

    fn create_file(path: &Path) -> std::io::Result<Self> {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        f.write_all(format!("{}\n", hex::encode(key)).as_bytes())?;
        f.sync_all()?;
        tracing::warn!(
            path = %path.display(),
            "created a new gateway master key; back it up and give every gateway instance the same one"
        );
        Ok(Self(key))
    }

    /// A key for one purpose, derived from the master key (so one purpose's key says
    /// nothing about another's).
    fn derive(&self, purpose: &str) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("any key length");
        mac.update(b"tokentally v1\0");
        mac.update(purpose.as_bytes());
        mac.finalize().into_bytes().into()
    }

    fn aad(institution: &str, provider: &str) -> Vec<u8> {
        // The row's place is authenticated: a ciphertext copied to another institution's
        // row does not decrypt.
        format!("upstream key\0{institution}\0{provider}").into_bytes()
    }

    /// Encrypts an institution's provider key: (nonce hex, ciphertext hex).
    pub fn seal(&self, institution: &str, provider: &str, plaintext: &str) -> (String, String) {
        let cipher = Aes256Gcm::new(&self.derive("upstream keys").into());
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let aad = Self::aad(institution, provider);
        let ct = cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: &aad,
                },
            )
            .expect("AES-GCM encryption of a short key cannot fail");
        (hex::encode(nonce), hex::encode(ct))
    }

    /// Decrypts what `seal` produced for the same institution and provider.
    pub fn open(
        &self,
        institution: &str,
        provider: &str,
        nonce_hex: &str,
        ciphertext_hex: &str,
    ) -> Result<String, CryptoError> {
        let cipher = Aes256Gcm::new(&self.derive("upstream keys").into());
        let mut nonce = [0u8; 12];
        hex::decode_to_slice(nonce_hex, &mut nonce).map_err(|_| CryptoError::Decrypt)?;
        let ct = hex::decode(ciphertext_hex).map_err(|_| CryptoError::Decrypt)?;
        let aad = Self::aad(institution, provider);
        let pt = cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &ct,
                    aad: &aad,
                },
            )
            .map_err(|_| CryptoError::Decrypt)?;
        String::from_utf8(pt).map_err(|_| CryptoError::Decrypt)
    }

    /// Tells two provider keys apart without revealing either (16 hex characters).
    pub fn fingerprint(&self, plaintext: &str) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.derive("fingerprints"))
            .expect("any key length");
        mac.update(plaintext.as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..8])
    }

    /// The key of pseudonymous end-user ids.
    pub fn pseudonyms(&self) -> Pseudonyms {
        Pseudonyms(self.derive("end-user ids"))
    }
}

/// Stable pseudonymous ids of (institution, user): the same person always gets the same
/// id, which tells the provider nothing about who it is; the gateway's operators can map
/// an abuse report back (`tokentally keys whois`).
#[derive(Clone)]
pub struct Pseudonyms([u8; 32]);

impl Pseudonyms {
    pub fn id(&self, institution: &str, user: &str) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("any key length");
        mac.update(institution.as_bytes());
        mac.update(b"\0");
        mac.update(user.as_bytes());
        format!("tt_{}", hex::encode(&mac.finalize().into_bytes()[..16]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> MasterKey {
        MasterKey::from_bytes([b; 32])
    }

    #[test]
    fn sealed_keys_open_only_in_their_place_and_with_their_master_key() {
        let k = key(7);
        let (nonce, ct) = k.seal("uni", "openai", "sk-very-secret");
        assert!(!ct.contains(&hex::encode("sk-very-secret")));
        assert_eq!(
            k.open("uni", "openai", &nonce, &ct).unwrap(),
            "sk-very-secret"
        );
        assert!(k.open("other", "openai", &nonce, &ct).is_err());
        assert!(k.open("uni", "anthropic", &nonce, &ct).is_err());
        assert!(key(8).open("uni", "openai", &nonce, &ct).is_err());
        let mut tampered = ct.clone().into_bytes();
        tampered[0] = if tampered[0] == b'0' { b'1' } else { b'0' };
        assert!(k
            .open(
                "uni",
                "openai",
                &nonce,
                std::str::from_utf8(&tampered).unwrap()
            )
            .is_err());
        // A fresh nonce every time.
        assert_ne!(k.seal("uni", "openai", "sk-very-secret").0, nonce);
    }

    #[test]
    fn pseudonyms_are_stable_distinct_and_keyed() {
        let p = key(1).pseudonyms();
        assert_eq!(p.id("uni", "alice"), p.id("uni", "alice"));
        assert_ne!(p.id("uni", "alice"), p.id("uni", "bob"));
        // The separator keeps ("ab","c") and ("a","bc") apart.
        assert_ne!(p.id("ab", "c"), p.id("a", "bc"));
        assert_ne!(p.id("uni", "alice"), key(2).pseudonyms().id("uni", "alice"));
        assert!(!p.id("uni", "alice").contains("alice"));
        assert_eq!(p.id("uni", "alice").len(), 35);
    }

    #[test]
    fn master_key_files_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let cfg = GatewayConfig {
            master_key_file: path.clone(),
            ..Default::default()
        };
        assert!(matches!(
            MasterKey::load(&cfg, false),
            Err(CryptoError::Missing(_))
        ));
        let created = MasterKey::load(&cfg, true).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = MasterKey::load(&cfg, false).unwrap();
        assert_eq!(created.0, again.0);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            MasterKey::load(&cfg, false),
            Err(CryptoError::OpenFile(_, 0o644))
        ));
        let from_env = GatewayConfig {
            master_key: crate::config::Secret::new("ab".repeat(32)),
            ..cfg.clone()
        };
        assert_eq!(MasterKey::load(&from_env, false).unwrap().0, [0xab; 32]);
        let bad = GatewayConfig {
            master_key: crate::config::Secret::new("xyz"),
            ..cfg
        };
        assert!(matches!(
            MasterKey::load(&bad, false),
            Err(CryptoError::BadMasterKey)
        ));
        assert_eq!(format!("{:?}", created), "MasterKey(<redacted>)");
    }
}
