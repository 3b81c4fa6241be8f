//! The rules file: tags, intent, lane, sink and routing hints from keywords and regexes.
//!
//! ```toml
//! [[rule]]
//! name = "refunds"                 # required, unique
//! keywords = ["refund", "chargeback"]  # case-insensitive substrings
//! regex = ['(?i)order #\d+']       # Rust regex syntax
//! source = "billing"               # optional: only envelopes from this source
//! tags = ["billing", "refund"]
//! intent = "refund_request"        # the first matching rule (file order) with one wins
//! lane = "high"                    # high|normal|low -> routing_hints.lane (first wins)
//! sink = "default"                 # -> routing_hints.sink (first wins); a configured sink
//! routing = { team = "payments" }  # more routing hints (first rule to set a key wins)
//! ```
//!
//! All keywords of all rules are matched in one pass (Aho-Corasick, ASCII case-insensitive),
//! all regexes in one pass (`RegexSet`), so the cost grows with the text, not with the rules.
//! A rule matches when any of its keywords or regexes does (and its `source` filter, if any).
//!
//! Regexes are the operator's and keep the regex crate's meaning, so `\b` is a Unicode word
//! boundary. On text with any non-ASCII character the crate's lazy DFA cannot evaluate one and
//! a slower engine scans the text instead; `(?-u:\b)` (an ASCII boundary) avoids that. With the
//! bench's dense rules (`(?i)\b(ticket|order|invoice)…`) one em dash per text took the gate
//! from 70k to 43k envelopes/s per core. The built-in PII patterns are ASCII-only for this reason.

use std::collections::{BTreeMap, BTreeSet};

use aho_corasick::AhoCorasick;
use regex::RegexSet;
use serde::Deserialize;

/// Bounds on a rules file, so a bad file cannot make the gate slow or huge.
pub const RULES_MAX: usize = 10_000;
pub const PATTERNS_PER_RULE_MAX: usize = 1_000;
pub const RULES_FILE_BYTES_MAX: u64 = 8 * 1024 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    rule: Vec<RuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    name: String,
    #[serde(default)]
    keywords: Vec<String>,
    #[serde(default)]
    regex: Vec<String>,
    source: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    intent: Option<String>,
    lane: Option<String>,
    sink: Option<String>,
    #[serde(default)]
    routing: BTreeMap<String, String>,
}

#[derive(Debug)]
struct Rule {
    name: String,
    source: Option<String>,
    tags: Vec<String>,
    intent: Option<String>,
    routing: Vec<(String, String)>,
}

/// Compiled rules.
#[derive(Debug)]
pub struct Rules {
    rules: Vec<Rule>,
    keywords: Option<AhoCorasick>,
    /// The same keywords with leftmost-first semantics, used only to ask whether any occurs:
    /// aho-corasick's prefilter is effective for leftmost searches but not for the standard
    /// (overlapping-capable) automaton, whose `is_match` walked every byte (1 KiB text with 60
    /// keywords: 1.8 us against 0.17 us).
    keywords_any: Option<AhoCorasick>,
    /// For each distinct (lowercased) keyword, the rules that list it.
    keyword_rules: Vec<Vec<usize>>,
    regexes: RegexSet,
    regex_rule: Vec<usize>,
}

/// What the rules decided for one envelope.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decision {
    pub tags: Vec<String>,
    pub intent: Option<String>,
    pub routing: BTreeMap<String, String>,
}

impl Rules {
    pub fn empty() -> Rules {
        Rules {
            rules: Vec::new(),
            keywords: None,
            keywords_any: None,
            keyword_rules: Vec::new(),
            regexes: RegexSet::empty(),
            regex_rule: Vec::new(),
        }
    }

    /// Parses and compiles a rules file; the error names the rule and what is wrong.
    pub fn parse(text: &str) -> Result<Rules, String> {
        let file: RuleFile = toml::from_str(text).map_err(|e| e.to_string())?;
        if file.rule.len() > RULES_MAX {
            return Err(format!(
                "{} rules, over the limit of {RULES_MAX}",
                file.rule.len()
            ));
        }
        let mut names = BTreeSet::new();
        let mut rules = Vec::new();
        let (mut kw, mut kw_rules, mut rx, mut rx_rule) =
            (Vec::new(), Vec::<Vec<usize>>::new(), Vec::new(), Vec::new());
        // Each distinct keyword is one pattern, however many rules list it: fewer patterns keep
        // the automaton's prefilter effective.
        let mut kw_index: std::collections::HashMap<String, usize> = Default::default();
        for (n, spec) in file.rule.into_iter().enumerate() {
            let bad = |why: String| format!("rule {:?} (#{}): {why}", spec.name, n + 1);
            if spec.name.is_empty() {
                return Err(bad("name must not be empty".into()));
            }
            if !names.insert(spec.name.clone()) {
                return Err(bad("duplicate name".into()));
            }
            if spec.keywords.is_empty() && spec.regex.is_empty() {
                return Err(bad("needs at least one keyword or regex".into()));
            }
            if spec.keywords.len() + spec.regex.len() > PATTERNS_PER_RULE_MAX {
                return Err(bad(format!("more than {PATTERNS_PER_RULE_MAX} patterns")));
            }
            if let Some(k) = spec.keywords.iter().find(|k| k.is_empty()) {
                return Err(bad(format!("empty keyword {k:?}")));
            }
            for r in &spec.regex {
                regex::Regex::new(r).map_err(|e| bad(format!("invalid regex {r:?}: {e}")))?;
            }
            let mut routing: Vec<(String, String)> = Vec::new();
            if let Some(lane) = &spec.lane {
                if !matches!(lane.as_str(), "high" | "normal" | "low") {
                    return Err(bad(format!(
                        "lane must be high, normal or low, not {lane:?}"
                    )));
                }
                routing.push(("lane".into(), lane.clone()));
            }
            if let Some(sink) = &spec.sink {
                routing.push(("sink".into(), sink.clone()));
            }
            routing.extend(spec.routing.iter().map(|(k, v)| (k.clone(), v.clone())));
            for k in &spec.keywords {
                let lowered = k.to_ascii_lowercase();
                let i = *kw_index.entry(lowered.clone()).or_insert_with(|| {
                    kw.push(lowered);
                    kw_rules.push(Vec::new());
                    kw.len() - 1
                });
                if !kw_rules[i].contains(&n) {
                    kw_rules[i].push(n);
                }
            }
            for r in &spec.regex {
                rx.push(r.clone());
                rx_rule.push(n);
            }
            let mut tags = spec.tags.clone();
            tags.sort();
            tags.dedup();
            rules.push(Rule {
                name: spec.name,
                source: spec.source,
                tags,
                intent: spec.intent,
                routing,
            });
        }
        let keywords = if kw.is_empty() {
            None
        } else {
            Some(
                // Keywords are stored lowercased and matched against a lowercased copy of the
                // text: ASCII case-insensitivity folded into the automaton costs about a quarter
                // more per byte than one lowercasing pass. A full DFA has the lowest cost per
                // byte for the overlapping search (every keyword of every rule must be seen);
                // its size is bounded by RULES_MAX and PATTERNS_PER_RULE_MAX, and past
                // aho-corasick's own limits the build falls back to its default automaton.
                AhoCorasick::builder()
                    .kind(Some(aho_corasick::AhoCorasickKind::DFA))
                    .build(&kw)
                    .or_else(|_| AhoCorasick::builder().build(&kw))
                    .map_err(|e| format!("keywords: {e}"))?,
            )
        };
        let keywords_any = if kw.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .match_kind(aho_corasick::MatchKind::LeftmostFirst)
                    .build(&kw)
                    .map_err(|e| format!("keywords: {e}"))?,
            )
        };
        let regexes = RegexSet::new(&rx).map_err(|e| format!("regexes: {e}"))?;
        Ok(Rules {
            rules,
            keywords,
            keywords_any,
            keyword_rules: kw_rules,
            regexes,
            regex_rule: rx_rule,
        })
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// The first rule that routes to a sink `known` does not name, as an error message. Such
    /// a record would go to the `default` sink instead (a sealed record keeps its hint, and
    /// the sink it names may be gone by the time it is re-sent), so a misspelt sink name
    /// would send a whole class of records to the wrong place without a word: the daemon
    /// refuses such a rules file instead, at start-up and on reload.
    pub fn unknown_sink(&self, known: &dyn Fn(&str) -> bool) -> Option<String> {
        self.rules.iter().enumerate().find_map(|(n, rule)| {
            rule.routing
                .iter()
                .find(|(k, v)| k == "sink" && !known(v))
                .map(|(_, sink)| {
                    format!(
                        "rule {:?} (#{}): sink {sink:?} is not configured (a [sinks.{sink}] \
                         section is needed)",
                        rule.name,
                        n + 1
                    )
                })
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Applies every matching rule, in file order.
    pub fn decide(&self, source: &str, text: &str) -> Decision {
        if self.rules.is_empty() {
            return Decision::default();
        }
        let mut hit = vec![false; self.rules.len()];
        if let (Some(ac), Some(any)) = (&self.keywords, &self.keywords_any) {
            let lowered = text.to_ascii_lowercase();
            // Most texts contain no keyword at all. The leftmost automaton's `is_match` skips
            // ahead with its prefilter, which the overlapping search (needed only when something
            // matches) cannot, so asking first is much cheaper on the common path.
            let overlapping = if any.is_match(lowered.as_str()) {
                ac.find_overlapping_iter(lowered.as_str())
            } else {
                ac.find_overlapping_iter("")
            };
            for m in overlapping {
                for &rule in &self.keyword_rules[m.pattern().as_usize()] {
                    hit[rule] = true;
                }
            }
        }
        // As for keywords: `is_match` may use a literal prefilter and stop at the first match,
        // while `matches` must scan every byte for every pattern.
        if !self.regexes.is_empty() && self.regexes.is_match(text) {
            for i in self.regexes.matches(text).iter() {
                hit[self.regex_rule[i]] = true;
            }
        }
        let mut d = Decision::default();
        let mut tags = BTreeSet::new();
        for (rule, _) in self.rules.iter().zip(&hit).filter(|(_, h)| **h) {
            if rule.source.as_deref().is_some_and(|s| s != source) {
                continue;
            }
            tags.extend(rule.tags.iter().cloned());
            if d.intent.is_none() {
                d.intent = rule.intent.clone();
            }
            for (k, v) in &rule.routing {
                d.routing.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        d.tags = tags.into_iter().collect();
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: &str = r#"
[[rule]]
name = "refunds"
keywords = ["Refund"]
tags = ["billing", "refund"]
intent = "refund_request"
lane = "high"
routing = { team = "payments" }

[[rule]]
name = "orders"
regex = ['(?i)order #\d+']
tags = ["orders", "billing"]
intent = "order_status"
sink = "orders"

[[rule]]
name = "only-from-crm"
keywords = ["vip"]
source = "crm"
tags = ["vip"]
"#;

    #[test]
    fn a_keyword_listed_by_two_rules_in_any_case_fires_both() {
        let r = Rules::parse(
            "[[rule]]\nname = \"a\"\nkeywords = [\"Refund\"]\ntags = [\"a\"]\n\n\
             [[rule]]\nname = \"b\"\nkeywords = [\"REFUND\", \"fund\"]\ntags = [\"b\"]\n",
        )
        .unwrap();
        assert_eq!(r.decide("s", "a rEfUnD please").tags, vec!["a", "b"]);
        assert_eq!(r.decide("s", "funding").tags, vec!["b"]);
        assert!(r.decide("s", "nothing here").tags.is_empty());
    }

    #[test]
    fn matching_rules_merge_tags_and_the_first_intent_wins() {
        let r = Rules::parse(RULES).unwrap();
        let d = r.decide("web", "A REFUND for order #42 please");
        assert_eq!(d.tags, vec!["billing", "orders", "refund"]);
        assert_eq!(d.intent.as_deref(), Some("refund_request"));
        assert_eq!(d.routing.get("lane").map(String::as_str), Some("high"));
        assert_eq!(d.routing.get("sink").map(String::as_str), Some("orders"));
        assert_eq!(d.routing.get("team").map(String::as_str), Some("payments"));
    }

    #[test]
    fn a_source_filter_limits_a_rule() {
        let r = Rules::parse(RULES).unwrap();
        assert!(r.decide("web", "vip").tags.is_empty());
        assert_eq!(r.decide("crm", "vip").tags, vec!["vip"]);
    }

    #[test]
    fn invalid_files_name_the_rule_and_the_problem() {
        let e = Rules::parse("[[rule]]\nname = \"x\"\nregex = [\"(\"]\n").unwrap_err();
        assert!(
            e.contains("rule \"x\"") && e.contains("invalid regex"),
            "{e}"
        );
        let e = Rules::parse("[[rule]]\nname = \"y\"\n").unwrap_err();
        assert!(e.contains("at least one keyword"), "{e}");
        let e = Rules::parse("[[rule]]\nname = \"z\"\nkeywords=[\"a\"]\nlane = \"fast\"\n")
            .unwrap_err();
        assert!(e.contains("lane"), "{e}");
        assert!(Rules::parse("[[rule]]\nname = \"q\"\nkeyword = [\"a\"]\n").is_err());
    }

    #[test]
    fn a_rule_routing_to_a_sink_not_configured_is_named_whether_by_sink_or_by_routing() {
        let r = Rules::parse(RULES).unwrap();
        assert_eq!(r.unknown_sink(&|s| s == "default" || s == "orders"), None);
        let e = r.unknown_sink(&|s| s == "default").unwrap();
        assert!(
            e.contains("rule \"orders\" (#2)") && e.contains("\"orders\""),
            "{e}"
        );
        let r = Rules::parse(
            "[[rule]]\nname = \"r\"\nkeywords = [\"a\"]\nrouting = { sink = \"ordres\" }\n",
        )
        .unwrap();
        let e = r.unknown_sink(&|s| s == "default").unwrap();
        assert!(
            e.contains("rule \"r\" (#1)") && e.contains("\"ordres\""),
            "{e}"
        );
    }
}
