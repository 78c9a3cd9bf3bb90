//! Credentials: node tokens bound to a node id, and API tokens with roles.
//!
//! docs/SECURITY.md says what each credential allows. Every comparison of
//! a presented secret is constant-time and checks every candidate, so the
//! time taken tells nothing about which one (if any) matched.

use lingua_shared::NodeId;
use ring::{digest, hmac};
use subtle::ConstantTimeEq;

/// The context string of a per-node token: changing it invalidates every
/// token derived so far.
const NODE_TOKEN_CONTEXT: &str = "lingua-node-token:v1:";

/// Secrets kept as their SHA-256 digests, taken once, when the config is
/// read. Digests are compared, all of one length: a comparison of the
/// texts themselves ends at once on lengths that differ, which tells a
/// guess's length was wrong.
#[derive(Clone, Default)]
pub struct Tokens(Vec<digest::Digest>);

impl Tokens {
    /// The digests of `tokens`.
    pub fn new(tokens: &[String]) -> Self {
        Self(tokens.iter().map(|token| sha256(token)).collect())
    }

    /// True when none is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// True when `presented` is one of them; every one is compared.
    pub fn contains(&self, presented: &str) -> bool {
        let presented = sha256(presented);
        self.0.iter().fold(false, |found, token| {
            found | bool::from(token.as_ref().ct_eq(presented.as_ref()))
        })
    }
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} set)", self.0.len())
    }
}

fn sha256(text: &str) -> digest::Digest {
    digest::digest(&digest::SHA256, text.as_bytes())
}

/// The token of `node` under `secret`: HMAC-SHA256 of the node id, hex.
/// A token for one node id is useless for any other.
pub fn node_token(secret: &str, node: &NodeId) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let tag = hmac::sign(&key, format!("{NODE_TOKEN_CONTEXT}{node}").as_bytes());
    hex(tag.as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a node may present to register.
#[derive(Debug, Clone, Default)]
pub struct NodeCredentials {
    /// Shared tokens: any of them registers any node id.
    pub shared: Tokens,
    /// The secrets per-node tokens derive from ([`node_token`]): the
    /// current one, and the one it replaces while hosts move over.
    pub secrets: Vec<String>,
}

impl NodeCredentials {
    /// True when nodes must present a token.
    pub fn required(&self) -> bool {
        !self.shared.is_empty() || !self.secrets.is_empty()
    }

    /// True when `presented` lets `node` register.
    pub fn allows(&self, node: &NodeId, presented: Option<&str>) -> bool {
        if !self.required() {
            return true;
        }
        let Some(presented) = presented else {
            return false;
        };
        let digest = sha256(presented);
        let derived = self.secrets.iter().fold(false, |found, secret| {
            let token = sha256(&node_token(secret, node));
            found | bool::from(token.as_ref().ct_eq(digest.as_ref()))
        });
        derived | self.shared.contains(presented)
    }
}

/// What an API caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything: nodes, pools, drain, metrics, any job.
    Admin,
    /// Submit jobs and read the jobs it submitted.
    Client,
}

/// An authenticated API caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// What it may do.
    pub role: Role,
    /// Whose jobs it submits: a fingerprint of a client token, empty for
    /// admins (and for everyone while the API is open).
    pub owner: String,
}

impl Caller {
    /// The caller of an open API (no tokens configured): an admin.
    pub fn open() -> Self {
        Self {
            role: Role::Admin,
            owner: String::new(),
        }
    }

    /// True when this caller may read a job submitted by `owner`.
    pub fn may_read(&self, owner: &str) -> bool {
        self.role == Role::Admin || self.owner == owner
    }
}

/// The API's tokens by role.
#[derive(Debug, Clone, Default)]
pub struct ApiTokens {
    /// Admin tokens (`[auth] api_tokens`).
    pub admin: Tokens,
    /// Client tokens (`[auth] client_tokens`).
    pub client: Tokens,
}

impl ApiTokens {
    /// True when no token is configured: every caller is an admin.
    pub fn open(&self) -> bool {
        self.admin.is_empty() && self.client.is_empty()
    }

    /// The caller presenting `authorization` (the header's value), or
    /// `None` when it is missing or wrong.
    pub fn caller(&self, authorization: Option<&str>) -> Option<Caller> {
        if self.open() {
            return Some(Caller::open());
        }
        let token = bearer(authorization?)?;
        let admin = self.admin.contains(token);
        let client = self.client.contains(token);
        if admin {
            Some(Caller::open())
        } else if client {
            Some(Caller {
                role: Role::Client,
                owner: fingerprint(token),
            })
        } else {
            None
        }
    }
}

/// The token of an `Authorization` header value with the bearer scheme,
/// whose name is case-insensitive (RFC 7235).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start())
}

/// A stable, non-secret name for a client token: the first 16 hex digits
/// of its SHA-256.
fn fingerprint(token: &str) -> String {
    let mut name = hex(sha256(token).as_ref());
    name.truncate(16);
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str) -> NodeId {
        NodeId::new(id).unwrap()
    }

    #[test]
    fn a_node_token_registers_its_own_node_only() {
        let credentials = NodeCredentials {
            shared: Tokens::default(),
            secrets: vec!["a-coordinator-secret-of-enough-length".into()],
        };
        let a = node_token(&credentials.secrets[0], &node("gpu-a"));
        assert_eq!(a.len(), 64);
        assert!(credentials.allows(&node("gpu-a"), Some(&a)));
        assert!(!credentials.allows(&node("gpu-b"), Some(&a)));
        assert!(!credentials.allows(&node("gpu-a"), None));
        assert!(!credentials.allows(&node("gpu-a"), Some("")));
    }

    /// While hosts move to a new node secret, a token of the previous one
    /// still registers its own node, and no other.
    #[test]
    fn a_token_of_the_previous_secret_registers_its_own_node_only() {
        let (new, old) = (
            "the-new-coordinator-secret-0123456",
            "the-old-coordinator-secret-6543210",
        );
        let credentials = NodeCredentials {
            shared: Tokens::default(),
            secrets: vec![new.into(), old.into()],
        };
        for secret in [new, old] {
            let a = node_token(secret, &node("gpu-a"));
            assert!(credentials.allows(&node("gpu-a"), Some(&a)));
            assert!(!credentials.allows(&node("gpu-b"), Some(&a)));
        }
        let unknown = node_token("a-third-secret-nobody-configured-00", &node("gpu-a"));
        assert!(!credentials.allows(&node("gpu-a"), Some(&unknown)));
    }

    #[test]
    fn a_shared_token_registers_any_node_and_no_tokens_means_open() {
        let shared = NodeCredentials {
            shared: Tokens::new(&["a-shared-node-token".into()]),
            secrets: Vec::new(),
        };
        assert!(shared.allows(&node("x"), Some("a-shared-node-token")));
        assert!(shared.allows(&node("y"), Some("a-shared-node-token")));
        assert!(!shared.allows(&node("y"), Some("a-shared-node-tokeN")));
        assert!(!shared.allows(&node("y"), Some("a-shared-node-toke")));
        assert!(!shared.allows(&node("y"), Some("a-shared-node-token ")));
        assert!(NodeCredentials::default().allows(&node("x"), None));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_roles_are_kept_apart() {
        let tokens = ApiTokens {
            admin: Tokens::new(&["admin-token-0123456789".into()]),
            client: Tokens::new(&["client-token-0123456789".into()]),
        };
        for header in [
            "Bearer admin-token-0123456789",
            "bearer admin-token-0123456789",
            "BEARER  admin-token-0123456789",
        ] {
            assert_eq!(
                tokens.caller(Some(header)),
                Some(Caller::open()),
                "{header}"
            );
        }
        let client = tokens
            .caller(Some("Bearer client-token-0123456789"))
            .unwrap();
        assert_eq!(client.role, Role::Client);
        assert_eq!(client.owner.len(), 16);
        assert!(client.may_read(&client.owner));
        assert!(!client.may_read(""));
        assert!(Caller::open().may_read(&client.owner));
        assert_eq!(tokens.caller(Some("Basic admin-token-0123456789")), None);
        assert_eq!(tokens.caller(Some("Bearer wrong")), None);
        assert_eq!(tokens.caller(None), None);
        assert_eq!(ApiTokens::default().caller(None), Some(Caller::open()));
    }
}
