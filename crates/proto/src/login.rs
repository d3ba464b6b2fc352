//! Login: a device proves to its homeserver that it holds its identity key by
//! signing a fresh challenge the server chose.

use tls_codec::{TlsDeserializeBytes, TlsSerializeBytes, TlsSize, VLBytes};

use crate::codec::{PROTOCOL_VERSION, encode, vl_bytes};
use crate::ids::{DeviceId, ServerName};
use crate::sign::{Label, SecretKey, SignatureError, SignaturePublicKey};

/// What a device signs to log in. Binding the server name and device id
/// means an answer for one server or device is useless at another.
///
/// ```text
/// struct {
///     uint16 version;          // 0
///     ServerName server;
///     opaque device[32];
///     opaque challenge<V>;     // 32 random bytes from the server
///     uint64 expires_at;
/// } LoginChallenge;
/// ```
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
pub struct LoginChallenge {
    version: u16,
    server: ServerName,
    device: DeviceId,
    challenge: VLBytes,
    expires_at: u64,
}

impl LoginChallenge {
    /// The challenge `server` issues to `device`.
    pub fn new(server: ServerName, device: DeviceId, challenge: [u8; 32], expires_at: u64) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            server,
            device,
            challenge: vl_bytes(&challenge),
            expires_at,
        }
    }

    /// The device's answer: its signature under label `LoginChallenge`.
    pub fn sign(&self, key: &SecretKey) -> Vec<u8> {
        key.sign(Label::LoginChallenge, &encode(self))
    }

    /// Checks an answer against the device's identity key.
    pub fn verify(&self, key: &SignaturePublicKey, signature: &[u8]) -> Result<(), SignatureError> {
        key.verify(Label::LoginChallenge, &encode(self), signature)
    }

    /// The server's random bytes.
    pub fn challenge(&self) -> &[u8] {
        self.challenge.as_slice()
    }

    /// When the challenge stops being accepted.
    pub fn expires_at(&self) -> u64 {
        self.expires_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_binds_server_and_device() {
        let key = SecretKey::from_seed([1; 32]);
        let device = DeviceId::of(&key.public());
        let c = LoginChallenge::new("a.test".parse().unwrap(), device, [7; 32], 10);
        let sig = c.sign(&key);
        c.verify(&key.public(), &sig).unwrap();
        let elsewhere = LoginChallenge::new("b.test".parse().unwrap(), device, [7; 32], 10);
        assert!(elsewhere.verify(&key.public(), &sig).is_err());
        let other_key = SecretKey::from_seed([2; 32]);
        assert!(c.verify(&other_key.public(), &sig).is_err());
    }
}
