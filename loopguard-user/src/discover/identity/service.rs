//! The user's mapping from executables and containers to service names.
//!
//! In: rules `PATTERN=SERVICE` (`--service-map`), each a glob over the
//! executable's name, or, written `container:PATTERN=SERVICE`, over the
//! container's name. Out:
//! the service of an [`Identity`]: the first rule that matches wins over
//! what the process declares and over its executable's name. A Python or
//! Node service is `python3.11` or `node` by its executable alone; a rule
//! (or `LOOPGUARD_SERVICE` / `OTEL_SERVICE_NAME` in its environment) names it.

use super::{Identity, label_value};
use crate::discover::glob;

/// What a rule's pattern is matched against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleSubject {
    Exe,
    Container,
}

/// One `PATTERN=SERVICE` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRule {
    pub subject: RuleSubject,
    pub pattern: String,
    pub service: String,
}

/// A rule that cannot be used, with what is wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "service mapping `{rule}` is not `PATTERN=SERVICE` or `container:PATTERN=SERVICE` with both sides non-empty (e.g. `stall-*=checkout`)"
)]
pub struct ServiceRuleError {
    pub rule: String,
}

impl std::str::FromStr for ServiceRule {
    type Err = ServiceRuleError;

    fn from_str(rule: &str) -> Result<Self, Self::Err> {
        let error = || ServiceRuleError {
            rule: rule.to_owned(),
        };
        let (pattern, service) = rule.rsplit_once('=').ok_or_else(error)?;
        let (subject, pattern) = match pattern.strip_prefix("container:") {
            Some(pattern) => (RuleSubject::Container, pattern),
            None => (RuleSubject::Exe, pattern),
        };
        let service = service.trim();
        if pattern.is_empty() || service.is_empty() || label_value(service) != service {
            return Err(error());
        }
        Ok(Self {
            subject,
            pattern: pattern.to_owned(),
            service: service.to_owned(),
        })
    }
}

impl std::fmt::Display for ServiceRule {
    /// The rule as written: `PATTERN=SERVICE` or `container:PATTERN=SERVICE`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.subject == RuleSubject::Container {
            f.write_str("container:")?;
        }
        write!(f, "{}={}", self.pattern, self.service)
    }
}

/// The rules, in the order given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceMap {
    rules: Vec<ServiceRule>,
}

impl ServiceMap {
    pub fn new(rules: Vec<ServiceRule>) -> Self {
        Self { rules }
    }

    /// The service the first matching rule gives, if any.
    pub fn service_for(&self, identity: &Identity) -> Option<&str> {
        self.rules
            .iter()
            .find(|rule| {
                let subject = match rule.subject {
                    RuleSubject::Exe => &identity.exe,
                    RuleSubject::Container => &identity.container,
                };
                !subject.is_empty() && glob::matches(&rule.pattern, subject)
            })
            .map(|rule| rule.service.as_str())
    }

    /// Sets `identity.service` from the first matching rule.
    pub fn apply(&self, identity: &mut Identity) {
        if let Some(service) = self.service_for(identity) {
            identity.service = service.to_owned();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_matching_rule_names_the_service() {
        let map = ServiceMap::new(vec![
            "container:shop-*=shop".parse().unwrap(),
            "python3*=python-app".parse().unwrap(),
            "stall-*=checkout".parse().unwrap(),
        ]);
        let mut identity = Identity {
            exe: "stall-server".into(),
            service: "stall-server".into(),
            ..Identity::default()
        };
        map.apply(&mut identity);
        assert_eq!(identity.service, "checkout");
        identity.container = "shop-api".into();
        map.apply(&mut identity);
        assert_eq!(identity.service, "shop");
        let node = Identity {
            exe: "node".into(),
            service: "node".into(),
            ..Identity::default()
        };
        assert_eq!(map.service_for(&node), None);
    }

    #[test]
    fn malformed_rules_are_refused_with_the_form() {
        for rule in ["noequals", "=svc", "exe=", "container:=svc", "x=a\nb"] {
            let error = rule.parse::<ServiceRule>().unwrap_err();
            assert!(error.to_string().contains("PATTERN=SERVICE"), "{error}");
        }
        assert_eq!(
            "a=b=c".parse::<ServiceRule>().unwrap().pattern,
            "a=b",
            "the service is after the last `=`"
        );
    }
}
