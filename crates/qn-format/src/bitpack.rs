//! Codes packed at exactly `bits` bits each, least-significant bit first.
//!
//! Value `i` occupies bits `i*bits .. (i+1)*bits` of the little-endian bit stream (bit 0 of byte 0
//! first). `n` values of `bits` bits take `ceil(n * bits / 8)` bytes; the unused high bits of the last
//! byte are zero.
//!
//! ```
//! use qn_format::bitpack::{pack, unpack, packed_len};
//! let codes = [1u16, 2, 3, 0, 7];
//! let bytes = pack(&codes, 3);
//! assert_eq!(bytes.len(), packed_len(5, 3).unwrap());
//! let mut back = [0u16; 5];
//! unpack(&bytes, 3, &mut back);
//! assert_eq!(back, codes);
//! ```

/// Bytes taken by `n` values of `bits` bits, or `None` on overflow.
pub fn packed_len(n: usize, bits: u32) -> Option<usize> {
    n.checked_mul(bits as usize)?.checked_add(7).map(|b| b / 8)
}

/// Packs `values` (each below `2^bits`, `1 <= bits <= 16`) into a bit stream.
pub fn pack(values: &[u16], bits: u32) -> Vec<u8> {
    assert!((1..=16).contains(&bits), "bits must be in 1..=16");
    let len = packed_len(values.len(), bits).expect("packed length overflows");
    match bits {
        8 => return values.iter().map(|&v| v as u8).collect(),
        16 => return values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        _ => {}
    }
    let mut out = Vec::with_capacity(len);
    let mask = (1u64 << bits) - 1;
    let (mut acc, mut nacc) = (0u64, 0u32);
    for &v in values {
        acc |= (v as u64 & mask) << nacc;
        nacc += bits;
        while nacc >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            nacc -= 8;
        }
    }
    if nacc > 0 {
        out.push(acc as u8);
    }
    debug_assert_eq!(out.len(), len);
    out
}

/// Unpacks `out.len()` values of `bits` bits from `bytes`, which must hold at least
/// `packed_len(out.len(), bits)` bytes.
pub fn unpack(bytes: &[u8], bits: u32, out: &mut [u16]) {
    assert!((1..=16).contains(&bits), "bits must be in 1..=16");
    let need = packed_len(out.len(), bits).expect("packed length overflows");
    assert!(
        bytes.len() >= need,
        "bit stream too short: {} < {need}",
        bytes.len()
    );
    match bits {
        8 => {
            out.iter_mut().zip(bytes).for_each(|(o, &b)| *o = b as u16);
            return;
        }
        16 => {
            out.iter_mut()
                .zip(bytes.chunks_exact(2))
                .for_each(|(o, b)| *o = u16::from_le_bytes([b[0], b[1]]));
            return;
        }
        _ => {}
    }
    let mask = (1u64 << bits) - 1;
    let (mut acc, mut nacc, mut next) = (0u64, 0u32, 0usize);
    for o in out.iter_mut() {
        while nacc < bits {
            acc |= (bytes[next] as u64) << nacc;
            next += 1;
            nacc += 8;
        }
        *o = (acc & mask) as u16;
        acc >>= bits;
        nacc -= bits;
    }
}
