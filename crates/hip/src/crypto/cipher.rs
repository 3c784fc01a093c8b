//! HIP_CIPHER algorithms for the ENCRYPTED parameter (RFC 7401 §5.2.8,
//! §5.2.18). AES-128-CBC is mandatory; NULL-ENCRYPT exists for debugging and
//! is only used when explicitly configured.
//!
//! Encryption pads with PKCS#7 (1..16 bytes, RFC 2898 §6.1.1). Decryption
//! does not trust the padding: the plaintext is a sequence of TLVs whose own
//! lengths delimit them, so trailing cipher padding is simply ignored.

use aes::cipher::{
    block_padding::NoPadding, block_padding::Pkcs7, BlockDecryptMut, BlockEncryptMut, KeyIvInit,
};
use rand_core::{OsRng, RngCore};

use crate::error::CryptoError;

pub const CIPHER_NULL: u16 = 1;
pub const CIPHER_AES_128_CBC: u16 = 2;
pub const CIPHER_AES_256_CBC: u16 = 4;

type Aes128CbcEnc = cbc::Encryptor<aes::Aes128>;
type Aes128CbcDec = cbc::Decryptor<aes::Aes128>;
type Aes256CbcEnc = cbc::Encryptor<aes::Aes256>;
type Aes256CbcDec = cbc::Decryptor<aes::Aes256>;

/// Key length in bytes ("natural size", §6.5).
pub fn key_len(cipher: u16) -> Result<usize, CryptoError> {
    match cipher {
        CIPHER_NULL => Ok(0),
        CIPHER_AES_128_CBC => Ok(16),
        CIPHER_AES_256_CBC => Ok(32),
        other => Err(CryptoError::Cipher(other)),
    }
}

/// IV length in bytes.
pub fn iv_len(cipher: u16) -> Result<usize, CryptoError> {
    match cipher {
        CIPHER_NULL => Ok(0),
        CIPHER_AES_128_CBC | CIPHER_AES_256_CBC => Ok(16),
        other => Err(CryptoError::Cipher(other)),
    }
}

/// Encrypts `plain`, returning IV | ciphertext with a fresh random IV.
pub fn encrypt(cipher: u16, key: &[u8], plain: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let mut iv = [0u8; 16];
    OsRng.fill_bytes(&mut iv);
    encrypt_with_iv(cipher, key, &iv, plain)
}

/// Encrypts with a given IV (known-answer tests).
pub fn encrypt_with_iv(
    cipher: u16,
    key: &[u8],
    iv: &[u8; 16],
    plain: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let mut out = Vec::new();
    match cipher {
        CIPHER_NULL => out.extend_from_slice(plain),
        CIPHER_AES_128_CBC => {
            let e =
                Aes128CbcEnc::new_from_slices(key, iv).map_err(|_| CryptoError::Cipher(cipher))?;
            out.extend_from_slice(iv);
            out.extend_from_slice(&e.encrypt_padded_vec_mut::<Pkcs7>(plain));
        }
        CIPHER_AES_256_CBC => {
            let e =
                Aes256CbcEnc::new_from_slices(key, iv).map_err(|_| CryptoError::Cipher(cipher))?;
            out.extend_from_slice(iv);
            out.extend_from_slice(&e.encrypt_padded_vec_mut::<Pkcs7>(plain));
        }
        other => return Err(CryptoError::Cipher(other)),
    }
    Ok(out)
}

/// Decrypts IV | ciphertext; the result still carries the cipher padding.
pub fn decrypt(cipher: u16, key: &[u8], data: &[u8]) -> Result<Vec<u8>, CryptoError> {
    match cipher {
        CIPHER_NULL => Ok(data.to_vec()),
        CIPHER_AES_128_CBC | CIPHER_AES_256_CBC => {
            if data.len() < 32 || !data.len().is_multiple_of(16) {
                return Err(CryptoError::Decrypt);
            }
            let (iv, ct) = data.split_at(16);
            let r = if cipher == CIPHER_AES_128_CBC {
                Aes128CbcDec::new_from_slices(key, iv)
                    .map_err(|_| CryptoError::Cipher(cipher))?
                    .decrypt_padded_vec_mut::<NoPadding>(ct)
            } else {
                Aes256CbcDec::new_from_slices(key, iv)
                    .map_err(|_| CryptoError::Cipher(cipher))?
                    .decrypt_padded_vec_mut::<NoPadding>(ct)
            };
            r.map_err(|_| CryptoError::Decrypt)
        }
        other => Err(CryptoError::Cipher(other)),
    }
}
