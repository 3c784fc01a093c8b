//! HIP cryptography: Diffie-Hellman groups, KEYMAT, the puzzle, HIP_MAC and
//! signature inputs, and the ENCRYPTED parameter's cipher.

pub mod cipher;
pub mod dh;
pub mod keymat;
pub mod mac;
pub mod puzzle;
