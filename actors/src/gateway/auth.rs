//! API keys: `Authorization: Bearer <key>` on every path but the exempt ones (`/health` and
//! `/metrics` by default, `[gateway] auth_exempt_paths`), answered 401 in OpenAI's error shape
//! (`invalid_request_error` / `invalid_api_key`) otherwise. Without keys the server is open.
//!
//! A presented key is compared with every configured key in time that does not depend on where
//! they differ (a remote client could otherwise guess a key byte by byte from response times);
//! only the lengths involved shape the time.

use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;

use super::http::{Shared, error_response};
use duet_openai::protocol::ApiError;

/// The keys a server accepts and the paths that need none.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    keys: Vec<Vec<u8>>,
    exempt_paths: Vec<String>,
}

impl ApiKeys {
    /// `keys` empty: every request is let through.
    pub fn new(keys: Vec<String>, exempt_paths: Vec<String>) -> Self {
        Self {
            keys: keys.into_iter().map(String::into_bytes).collect(),
            exempt_paths,
        }
    }

    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Whether a request for `path` with this `Authorization` header may pass.
    pub fn check(&self, path: &str, authorization: Option<&[u8]>) -> Result<(), ApiError> {
        if !self.enabled() || self.exempt_paths.iter().any(|p| p == path) {
            return Ok(());
        }
        let Some(value) = authorization else {
            return Err(unauthorized(
                "You didn't provide an API key. Provide it in the Authorization header as \
                 `Authorization: Bearer <key>`.",
            ));
        };
        let presented = value
            .strip_prefix(b"Bearer ")
            .or_else(|| value.strip_prefix(b"bearer "))
            .unwrap_or(b"");
        // Every key is compared, so the time does not say which one (if any) matched.
        let mut ok = false;
        for k in &self.keys {
            ok |= constant_time_eq(k, presented);
        }
        if ok {
            Ok(())
        } else {
            Err(unauthorized("Incorrect API key provided."))
        }
    }
}

fn unauthorized(message: &str) -> ApiError {
    ApiError {
        status: 401,
        message: message.into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("invalid_api_key".into()),
    }
}

/// Equality whose time depends only on the longer length, never on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= std::hint::black_box(x ^ y);
    }
    diff == 0
}

/// The middleware in front of every route.
pub async fn require_key(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    match s.api_keys.check(req.uri().path(), auth) {
        Ok(()) => next.run(req).await,
        Err(e) => {
            let mut r = error_response(e);
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> ApiKeys {
        ApiKeys::new(
            vec!["sk-one".into(), "sk-two".into()],
            vec!["/health".into(), "/metrics".into()],
        )
    }

    #[test]
    fn bearer_keys_and_exempt_paths() {
        let k = keys();
        assert!(k.check("/v1/models", Some(b"Bearer sk-one")).is_ok());
        assert!(k.check("/v1/models", Some(b"Bearer sk-two")).is_ok());
        for bad in [
            &b"Bearer sk-on"[..],
            b"Bearer sk-one2",
            b"Bearer ",
            b"sk-one",
            b"Basic sk-one",
        ] {
            let e = k.check("/v1/models", Some(bad)).unwrap_err();
            assert_eq!(
                (e.status, e.code.as_deref()),
                (401, Some("invalid_api_key"))
            );
        }
        let e = k.check("/generate", None).unwrap_err();
        assert!(e.message.contains("didn't provide"), "{}", e.message);
        assert!(k.check("/health", None).is_ok());
        assert!(k.check("/metrics", None).is_ok());
        assert!(k.check("/health/x", None).is_err());
        // No keys: open.
        assert!(ApiKeys::default().check("/v1/models", None).is_ok());
    }

    #[test]
    fn constant_time_eq_is_eq() {
        for (a, b) in [("", ""), ("a", "a"), ("a", ""), ("ab", "a"), ("ab", "ac")] {
            assert_eq!(
                constant_time_eq(a.as_bytes(), b.as_bytes()),
                a == b,
                "{a} {b}"
            );
        }
    }
}
