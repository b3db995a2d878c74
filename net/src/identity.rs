//! Who is at the other end: a node's name, read from its (already verified) certificate.
//!
//! The identity is the certificate's first DNS subject alternative name, or its subject common
//! name when it has no DNS name. Certificates from [`crate::ca`] carry the node name in both.
//! The DNS names come from rustls-webpki's parser; the common name from a small DER walk over
//! the subject, which only ever reads inside the slices it is given.

use rustls::pki_types::CertificateDer;

use crate::NetError;

/// The node name in a certificate.
pub fn cert_identity(cert: &CertificateDer<'_>) -> Result<String, NetError> {
    let parsed = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| NetError::Identity(format!("unparsable certificate: {e}")))?;
    if let Some(dns) = parsed.valid_dns_names().next() {
        return Ok(dns.to_string());
    }
    common_name(parsed.subject())
        .ok_or_else(|| NetError::Identity("the certificate has neither a DNS name nor a common name".into()))
}

/// The node name of a connection's peer, from the certificate it authenticated with.
pub fn peer_identity(conn: &quinn::Connection) -> Result<String, NetError> {
    let identity =
        conn.peer_identity().ok_or_else(|| NetError::Identity("the peer presented no certificate".into()))?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| NetError::Identity("the peer identity is not a certificate chain".into()))?;
    let leaf = chain.first().ok_or_else(|| NetError::Identity("the peer's certificate chain is empty".into()))?;
    cert_identity(leaf)
}

/// The first common name in a DER `Name`'s contents (a sequence of RDN sets).
pub(crate) fn common_name(name: &[u8]) -> Option<String> {
    const SET: u8 = 0x31;
    const SEQUENCE: u8 = 0x30;
    const OID: u8 = 0x06;
    const CN_OID: &[u8] = &[0x55, 0x04, 0x03]; // 2.5.4.3
    let mut rdns = name;
    while let Some((tag, rdn, rest)) = tlv(rdns) {
        rdns = rest;
        if tag != SET {
            continue;
        }
        let mut attrs = rdn;
        while let Some((tag, attr, rest)) = tlv(attrs) {
            attrs = rest;
            if tag != SEQUENCE {
                continue;
            }
            let Some((OID, oid, value)) = tlv(attr) else { continue };
            if oid != CN_OID {
                continue;
            }
            // UTF8String, PrintableString, IA5String.
            if let Some((0x0c | 0x13 | 0x16, text, _)) = tlv(value) {
                return std::str::from_utf8(text).ok().map(str::to_string);
            }
        }
    }
    None
}

/// Splits one DER TLV with a single-byte tag off the front: (tag, contents, rest).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, input) = input.split_first()?;
    let (&first, mut input) = input.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || input.len() < n {
            return None;
        }
        let (bytes, rest) = input.split_at(n);
        input = rest;
        bytes.iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
    };
    (input.len() >= len).then(|| (tag, &input[..len], &input[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_name_is_found_among_other_attributes() {
        // SET { SEQ { OID 2.5.4.10 (O), UTF8 "herd" } }, SET { SEQ { OID 2.5.4.3 (CN), PRINTABLE "w-1" } }
        let name = [
            0x31, 0x0d, 0x30, 0x0b, 0x06, 0x03, 0x55, 0x04, 0x0a, 0x0c, 0x04, b'h', b'e', b'r', b'd', //
            0x31, 0x0c, 0x30, 0x0a, 0x06, 0x03, 0x55, 0x04, 0x03, 0x13, 0x03, b'w', b'-', b'1',
        ];
        assert_eq!(common_name(&name).as_deref(), Some("w-1"));
    }

    #[test]
    fn truncated_or_hostile_der_yields_nothing() {
        assert_eq!(common_name(&[]), None);
        assert_eq!(common_name(&[0x31]), None);
        assert_eq!(common_name(&[0x31, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(common_name(&[0x31, 0x05, 0x30, 0x03, 0x06, 0x09, 0x55]), None);
        assert_eq!(common_name(&[0x31, 0x80]), None);
    }
}
