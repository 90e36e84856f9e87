//! Shared-key authentication by challenge-response.
//!
//! The server keeps a secret key; a client proves it holds the same key by
//! returning an HMAC-SHA256 over both sides' nonces and its identity, and the
//! server proves the same back. The key itself never crosses the wire, and a
//! recorded exchange is useless for a new connection (fresh nonces).

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use uuid::Uuid;

pub const KEY_LEN: usize = 32;
pub const NONCE_LEN: usize = 32;

/// The shared secret. Debug output never shows it.
#[derive(Clone)]
pub struct Key([u8; KEY_LEN]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("key file {path} is not a valid key: expected {} hex digits", KEY_LEN * 2)]
    Format { path: String },
    #[error("cannot create key file {path}: {source}")]
    Create { path: String, source: std::io::Error },
}

impl Key {
    pub fn random() -> Key {
        Key(random_bytes())
    }

    pub fn from_bytes(b: [u8; KEY_LEN]) -> Key {
        Key(b)
    }

    /// Reads a key file: hex digits, surrounding whitespace ignored.
    pub fn load(path: &Path) -> Result<Key, KeyError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| KeyError::Read { path: path.display().to_string(), source })?;
        Self::parse(text.trim()).ok_or_else(|| KeyError::Format { path: path.display().to_string() })
    }

    fn parse(hex: &str) -> Option<Key> {
        if hex.len() != KEY_LEN * 2 || !hex.is_ascii() {
            return None;
        }
        let mut out = [0u8; KEY_LEN];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Key(out))
    }

    fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Loads the key at `path`, creating a fresh one (mode 0600) if there is
    /// none. Creation writes a temporary file, fsyncs and renames it, so a
    /// crash never leaves a half-written key behind.
    pub fn load_or_create(path: &Path) -> Result<Key, KeyError> {
        match Self::load(path) {
            Ok(k) => return Ok(k),
            Err(KeyError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let key = Key::random();
        let create = |source| KeyError::Create { path: path.display().to_string(), source };
        let tmp = path.with_extension("key.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(create)?;
        writeln!(f, "{}", key.to_hex()).map_err(create)?;
        f.sync_all().map_err(create)?;
        std::fs::rename(&tmp, path).map_err(create)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(create)?;
        }
        Ok(key)
    }

    fn mac(&self, label: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(label);
        for p in parts {
            m.update(&(p.len() as u32).to_be_bytes());
            m.update(p);
        }
        m.finalize().into_bytes().to_vec()
    }

    /// What the client sends to prove it holds the key.
    pub fn client_proof(&self, client: Uuid, client_nonce: &[u8], server_nonce: &[u8]) -> Vec<u8> {
        self.mac(b"afs client proof", &[client.as_bytes(), client_nonce, server_nonce])
    }

    /// What the server sends back to prove the same.
    pub fn server_proof(&self, client: Uuid, client_nonce: &[u8], server_nonce: &[u8]) -> Vec<u8> {
        self.mac(b"afs server proof", &[client.as_bytes(), client_nonce, server_nonce])
    }

    /// Constant-time check of a client's proof.
    pub fn verify_client(&self, client: Uuid, client_nonce: &[u8], server_nonce: &[u8], mac: &[u8]) -> bool {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(b"afs client proof");
        for p in [client.as_bytes().as_slice(), client_nonce, server_nonce] {
            m.update(&(p.len() as u32).to_be_bytes());
            m.update(p);
        }
        m.verify_slice(mac).is_ok()
    }

    pub fn verify_server(&self, client: Uuid, client_nonce: &[u8], server_nonce: &[u8], mac: &[u8]) -> bool {
        let expected = self.server_proof(client, client_nonce, server_nonce);
        expected.len() == mac.len() && expected.iter().zip(mac).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).expect("the OS random source is available");
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_verify_only_with_the_same_key_and_nonces() {
        let (k, other) = (Key::random(), Key::random());
        let c = Uuid::from_u128(5);
        let (cn, sn) = (random_bytes::<32>(), random_bytes::<32>());
        let p = k.client_proof(c, &cn, &sn);
        assert!(k.verify_client(c, &cn, &sn, &p));
        assert!(!other.verify_client(c, &cn, &sn, &p));
        assert!(!k.verify_client(Uuid::from_u128(6), &cn, &sn, &p));
        assert!(!k.verify_client(c, &cn, &random_bytes::<32>(), &p));
        assert!(!k.verify_client(c, &cn, &sn, &[]));
        let s = k.server_proof(c, &cn, &sn);
        assert_ne!(s, p, "client and server proofs differ");
        assert!(k.verify_server(c, &cn, &sn, &s));
        assert!(!other.verify_server(c, &cn, &sn, &s));
    }

    #[test]
    fn key_files_are_created_private_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("afs-key-test-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("afs.key");
        let k1 = Key::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let k2 = Key::load_or_create(&path).unwrap();
        assert_eq!(k1.0, k2.0);
        std::fs::write(&path, "not hex").unwrap();
        assert!(matches!(Key::load(&path), Err(KeyError::Format { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
