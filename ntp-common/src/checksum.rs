//! Internet checksum (RFC 1071) pieces, byte-wise so they run on unaligned packet data.

/// Adds big-endian 16-bit words of `bytes` (even length) to a 32-bit accumulator. Callers keep
/// inputs small (at most a few hundred bytes), so the accumulator cannot overflow.
#[inline(always)]
pub fn add_words(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += ((bytes[i] as u32) << 8) | bytes[i + 1] as u32;
        i += 2;
    }
    sum
}

/// The RFC 1071 sum of data read as native little-endian 32-bit words (`le_words`, four bytes
/// each), as the big-endian 16-bit word sum the other functions here take. The Internet
/// checksum does not care about byte order (RFC 1071 §2(B)): summing little-endian words and
/// swapping the folded result gives the same sum, with a quarter of the loads of [`add_words`].
#[inline(always)]
pub fn le_words_sum(le_words: u64) -> u32 {
    let mut s = le_words;
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    (s as u16).swap_bytes() as u32
}

/// `bytes` (a multiple of four long) summed as native little-endian 32-bit words: what the
/// eBPF side's wide loads add up, computed over a slice, for [`le_words_sum`].
pub fn le_words(bytes: &[u8]) -> u64 {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u64)
        .sum()
}

/// Folds a 32-bit accumulator to 16 bits with end-around carry (not complemented).
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum field value for data whose words sum to `sum` (with the field itself as 0).
#[inline(always)]
pub fn finish(sum: u32) -> u16 {
    !fold(sum)
}

/// UDP's transmitted form: a computed 0 is sent as 0xFFFF, since 0 means "no checksum" (RFC 768).
#[inline(always)]
pub fn finish_udp(sum: u32) -> u16 {
    let c = finish(sum);
    if c == 0 {
        0xffff
    } else {
        c
    }
}

/// Whether a received datagram's words, checksum field included, verify.
#[inline(always)]
pub fn verifies(sum_with_field: u32) -> bool {
    fold(sum_with_field) == 0xffff
}

/// Pseudo-header sum for IPv4 UDP: the addresses' words plus protocol and UDP length.
#[inline(always)]
pub fn pseudo_v4(src: &[u8; 4], dst: &[u8; 4], udp_len: u16) -> u32 {
    add_words(add_words(0, src), dst) + crate::wire::IPPROTO_UDP as u32 + udp_len as u32
}

/// Pseudo-header sum for IPv6 UDP (RFC 8200 §8.1).
#[inline(always)]
pub fn pseudo_v6(src: &[u8; 16], dst: &[u8; 16], udp_len: u16) -> u32 {
    add_words(add_words(0, src), dst) + crate::wire::IPPROTO_UDP as u32 + udp_len as u32
}

/// Whether a UDP checksum field value is acceptable for a request.
///
/// Three forms are accepted: a full checksum that verifies; zero over IPv4 (RFC 768: no
/// checksum); and the pseudo-header seed that checksum offload (CHECKSUM_PARTIAL) leaves in frames
/// that veth and virtio guests hand over unfinished. The seed is the folded, uncomplemented
/// pseudo-header sum, which is what Linux writes before it expects the device to finish the job.
#[inline(always)]
pub fn udp_request_checksum_ok(
    field: u16,
    sum_with_field: u32,
    pseudo_sum: u32,
    is_ipv4: bool,
) -> bool {
    (field == 0 && is_ipv4) || verifies(sum_with_field) || field == fold(pseudo_sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: words 0001 f203 f4f5 f6f7 sum to ddf2 (folded).
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(add_words(0, &data)), 0xddf2);
        assert_eq!(finish(add_words(0, &data)), !0xddf2);
    }

    #[test]
    fn ipv4_header_checksum() {
        // A well-known IPv4 header with checksum 0xb861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(finish(add_words(0, &h)), 0xb861);
        h[10] = 0xb8;
        h[11] = 0x61;
        assert!(verifies(add_words(0, &h)));
        h[8] = 0x3f;
        assert!(!verifies(add_words(0, &h)));
    }

    #[test]
    fn le_words_sum_matches_byte_wise() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for len in [4usize, 8, 20, 56, 60] {
            for _ in 0..2000 {
                let mut data = [0u8; 60];
                for b in data.iter_mut().take(len) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
                assert_eq!(
                    fold(le_words_sum(le_words(&data[..len]))),
                    fold(add_words(0, &data[..len]))
                );
            }
        }
        // All ones and all zeros: the two representations of zero stay apart.
        assert_eq!(le_words_sum(4 * 0xffff_ffff), 0xffff);
        assert_eq!(le_words_sum(0), 0);
    }

    #[test]
    fn udp_zero_is_sent_as_ffff() {
        // Words summing to 0xffff give a computed checksum of 0.
        assert_eq!(finish(0xffff), 0);
        assert_eq!(finish_udp(0xffff), 0xffff);
    }

    #[test]
    fn request_checksum_forms() {
        let src = [169, 254, 1, 2];
        let dst = [169, 254, 169, 123];
        let pseudo = pseudo_v4(&src, &dst, 56);
        let body_sum = 0x1234u32; // words of UDP header and payload, field zeroed
        let full = finish_udp(pseudo + body_sum);
        assert!(udp_request_checksum_ok(
            full,
            pseudo + body_sum + full as u32,
            pseudo,
            true
        ));
        assert!(udp_request_checksum_ok(0, pseudo + body_sum, pseudo, true));
        assert!(!udp_request_checksum_ok(
            0,
            pseudo + body_sum,
            pseudo,
            false
        ));
        let seed = fold(pseudo);
        assert!(udp_request_checksum_ok(
            seed,
            pseudo + body_sum + seed as u32,
            pseudo,
            true
        ));
        let wrong = full.wrapping_add(1);
        assert!(!udp_request_checksum_ok(
            wrong,
            pseudo + body_sum + wrong as u32,
            pseudo,
            true
        ));
    }
}
