//! Credentials bound to Kith device identity.
//!
//! A device's MLS signature key *is* its Kith identity key (Ed25519), and
//! its credential is a `basic` credential whose identity is the 32-byte
//! [`DeviceId`] of that key. A leaf is **bound** when
//! `credential.identity == DeviceId::of(leaf.signature_key)`; Kith rejects
//! every leaf that is not (in key packages, adds, updates, welcomes and
//! trees handed to servers).
//!
//! MLS signs with its own labels (`"MLS 1.0 " + label`) and Kith with
//! `"kith-v0 " + label`, so one key can safely sign both.

use ed25519_dalek::Signer as _;
use kith_proto::{DeviceId, SecretKey, SignaturePublicKey};
use openmls::prelude::{
    BasicCredential, Credential, CredentialType, CredentialWithKey, LeafNode, SignatureScheme,
};
use openmls_traits::signatures::{Signer, SignerError};

/// Why a leaf's credential does not match its signature key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    /// The credential is not a `basic` credential.
    #[error("credential type {0:?} is not basic")]
    NotBasic(CredentialType),
    /// The credential's identity is not 32 bytes long.
    #[error("credential identity is {0} bytes, a DeviceId is 32")]
    IdentityLength(usize),
    /// The signature key is not a 32-byte Ed25519 key.
    #[error("leaf signature key is {0} bytes, an Ed25519 key is 32")]
    KeyLength(usize),
    /// The credential names a different device than the key identifies.
    #[error("credential names device {claimed} but the leaf key is device {actual}")]
    Mismatch {
        /// The DeviceId in the credential.
        claimed: DeviceId,
        /// The DeviceId of the leaf's signature key.
        actual: DeviceId,
    },
}

/// The DeviceId a credential names, without checking it against any key.
///
/// Use only for credentials of leaves that were checked with
/// [`bound_device_id`] when they entered the group.
pub fn credential_device_id(credential: &Credential) -> Result<DeviceId, BindingError> {
    if credential.credential_type() != CredentialType::Basic {
        return Err(BindingError::NotBasic(credential.credential_type()));
    }
    let basic = BasicCredential::try_from(credential.clone())
        .map_err(|_| BindingError::NotBasic(credential.credential_type()))?;
    let bytes: [u8; 32] = basic
        .identity()
        .try_into()
        .map_err(|_| BindingError::IdentityLength(basic.identity().len()))?;
    Ok(DeviceId::from_bytes(bytes))
}

/// Checks that `credential` names the device whose Ed25519 key is
/// `signature_key` (raw 32 bytes, as in an MLS leaf) and returns that id.
pub fn bound_device_id(
    credential: &Credential,
    signature_key: &[u8],
) -> Result<DeviceId, BindingError> {
    let claimed = credential_device_id(credential)?;
    let key: [u8; 32] = signature_key
        .try_into()
        .map_err(|_| BindingError::KeyLength(signature_key.len()))?;
    let actual = DeviceId::of(&SignaturePublicKey::ed25519(key));
    if claimed != actual {
        return Err(BindingError::Mismatch { claimed, actual });
    }
    Ok(actual)
}

/// [`bound_device_id`] for a leaf node.
pub fn leaf_device_id(leaf: &LeafNode) -> Result<DeviceId, BindingError> {
    bound_device_id(leaf.credential(), leaf.signature_key().as_slice())
}

/// Signs MLS objects with a device's Kith identity key.
///
/// Implements OpenMLS's [`Signer`]: plain Ed25519 over the payload OpenMLS
/// hands it (which OpenMLS has already labelled).
pub struct DeviceSigner {
    key: ed25519_dalek::SigningKey,
    device: DeviceId,
}

impl DeviceSigner {
    /// The signer for the device whose identity key is `secret`.
    pub fn new(secret: &SecretKey) -> Self {
        let key = ed25519_dalek::SigningKey::from_bytes(&secret.to_seed());
        let device = DeviceId::of(&secret.public());
        Self { key, device }
    }

    /// The device this signer signs for.
    pub fn device_id(&self) -> DeviceId {
        self.device
    }

    /// The raw 32-byte Ed25519 public key, as it appears in MLS leaves.
    pub fn public_key_bytes(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// The device's MLS credential and signature key: a `basic` credential
    /// whose identity is the 32-byte DeviceId.
    pub fn credential_with_key(&self) -> CredentialWithKey {
        CredentialWithKey {
            credential: BasicCredential::new(self.device.as_bytes().to_vec()).into(),
            signature_key: self.public_key_bytes().to_vec().into(),
        }
    }
}

impl Signer for DeviceSigner {
    fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, SignerError> {
        Ok(self.key.sign(payload).to_bytes().to_vec())
    }

    fn signature_scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

impl std::fmt::Debug for DeviceSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("DeviceSigner").field(&self.device).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_credential_is_bound() {
        let signer = DeviceSigner::new(&SecretKey::generate());
        let cwk = signer.credential_with_key();
        assert_eq!(
            bound_device_id(&cwk.credential, cwk.signature_key.as_slice()),
            Ok(signer.device_id())
        );
    }

    #[test]
    fn foreign_credential_is_not() {
        let a = DeviceSigner::new(&SecretKey::generate());
        let b = DeviceSigner::new(&SecretKey::generate());
        let cred = a.credential_with_key().credential;
        assert!(matches!(
            bound_device_id(&cred, &b.public_key_bytes()),
            Err(BindingError::Mismatch { .. })
        ));
        let short: Credential = BasicCredential::new(vec![1, 2, 3]).into();
        assert_eq!(
            bound_device_id(&short, &a.public_key_bytes()),
            Err(BindingError::IdentityLength(3))
        );
    }
}
