//! Standard Webhooks signatures: `webhook-signature: v1,<base64>` where the
//! base64 is HMAC-SHA256, keyed with the secret's decoded bytes, over
//! `"{webhook-id}.{webhook-timestamp}.{body}"`. Secrets are written
//! `whsec_<base64 of the key bytes>`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const PREFIX: &str = "whsec_";
/// Shortest key accepted, in bytes.
const MIN_KEY: usize = 16;
/// Length of a generated key, in bytes.
const GENERATED_KEY: usize = 32;

/// A webhook signing secret. Its `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    key: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

impl Secret {
    /// Parses `whsec_<base64>`.
    pub fn parse(text: &str) -> Result<Secret, String> {
        let encoded = text
            .strip_prefix(PREFIX)
            .ok_or_else(|| format!("a webhook secret starts with `{PREFIX}` followed by base64"))?;
        let key = STANDARD
            .decode(encoded)
            .map_err(|e| format!("the webhook secret is not valid base64: {e}"))?;
        if key.len() < MIN_KEY {
            return Err(format!(
                "the webhook secret must decode to at least {MIN_KEY} bytes"
            ));
        }
        Ok(Secret { key })
    }

    /// A new random secret from the operating system's generator.
    pub fn generate() -> Secret {
        let mut key = vec![0u8; GENERATED_KEY];
        getrandom::fill(&mut key).expect("the OS random generator is available");
        Secret { key }
    }

    /// The `whsec_…` form, for storing and sharing with receivers.
    pub fn to_whsec(&self) -> String {
        format!("{PREFIX}{}", STANDARD.encode(&self.key))
    }

    /// The `webhook-signature` header value for one attempt.
    pub fn sign(&self, id: &str, timestamp: i64, body: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(format!("{id}.{timestamp}.").as_bytes());
        mac.update(body.as_bytes());
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_specification_example() {
        // The example of the Standard Webhooks specification.
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = r#"{"test": 2432232314}"#;
        assert_eq!(
            secret.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn round_trips_and_rejects_bad_secrets() {
        let secret = Secret::generate();
        assert_eq!(Secret::parse(&secret.to_whsec()).unwrap(), secret);
        assert!(
            Secret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
                .unwrap_err()
                .contains("whsec_")
        );
        assert!(Secret::parse("whsec_!!!").unwrap_err().contains("base64"));
        assert!(
            Secret::parse("whsec_c2hvcnQ=")
                .unwrap_err()
                .contains("at least")
        );
        assert_eq!(format!("{secret:?}"), "Secret(…)");
    }
}
