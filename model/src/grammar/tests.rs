use super::*;
use crate::tokenizer::TextTokenizer;

/// The shipped R1 tokenizer (what the tiny checkpoints use) and a compiler over it.
fn r1() -> (TextTokenizer, GrammarCompiler) {
    let (json, cfg) = crate::tiny::r1_tokenizer_files().unwrap();
    let cfg: serde_json::Value = serde_json::from_str(cfg).unwrap();
    let tok = TextTokenizer::from_bytes(&json, &cfg, "r1".as_ref()).unwrap();
    let eos = tok.token_to_id("<｜end▁of▁sentence｜>").unwrap();
    (tok, GrammarCompiler::new(json.into(), vec![eos]))
}

fn spec(kind: GrammarKind, source: &str) -> GrammarSpec {
    GrammarSpec {
        kind,
        source: source.into(),
        starts_after: None,
    }
}

/// Greedy decoding under the grammar from logits that prefer `pull` (a token id) everywhere:
/// whatever the logits want, the output is a sentence of the grammar.
fn decode(c: &GrammarCompiler, tok: &TextTokenizer, s: &GrammarSpec, pull: u32) -> String {
    let mut m = c.compile(s).unwrap();
    let vocab = tok.vocab_size();
    let eos = c.eos_ids[0];
    let mut out = vec![];
    for step in 0..64u32 {
        m.advance(&out).unwrap();
        // A different favourite each step, so the walk is not one repeated token.
        let mut logits: Vec<f32> = (0..vocab as u32)
            .map(|t| ((t.wrapping_mul(2654435761) ^ step) % 1000) as f32 / 1000.0)
            .collect();
        logits[pull as usize] = 10.0;
        m.mask_logits(&mut logits).unwrap();
        let (best, _) = logits
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (i, &v)| if v > b.1 { (i, v) } else { b },
            );
        if best as u32 == eos {
            return tok.decode(&out, false).unwrap();
        }
        out.push(best as u32);
    }
    panic!("no end within 64 tokens: {:?}", tok.decode(&out, false));
}

#[test]
fn a_regex_holds_the_output_whatever_the_logits_prefer() {
    let (tok, c) = r1();
    let pull = tok.encode("hello", false).unwrap()[0];
    let text = decode(&c, &tok, &spec(GrammarKind::Regex, "(yes|no)[0-9]"), pull);
    assert!(
        ["yes", "no"].iter().any(|p| text.starts_with(p)) && text.len() <= 4,
        "{text:?}"
    );
    assert!(text.chars().last().unwrap().is_ascii_digit(), "{text:?}");
}

#[test]
fn a_json_schema_yields_json_that_validates() {
    let (tok, c) = r1();
    let schema = r#"{"type":"object","properties":{"ok":{"type":"boolean"},
        "colour":{"enum":["red","green"]}},"required":["ok","colour"],"additionalProperties":false}"#;
    let pull = tok.encode("{", false).unwrap()[0];
    let text = decode(&c, &tok, &spec(GrammarKind::JsonSchema, schema), pull);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(v["ok"].is_boolean(), "{text}");
    assert!(
        ["red", "green"].contains(&v["colour"].as_str().unwrap()),
        "{text}"
    );
    assert_eq!(v.as_object().unwrap().len(), 2, "{text}");
}

#[test]
fn gbnf_translates_into_lark_that_constrains() {
    let (tok, c) = r1();
    let lark = gbnf_to_lark(
        "# a greeting\nroot ::= greet \" \" name\ngreet ::= (\"hi\" | \"yo\")\nname ::= [a-c]+ \"!\"\n",
    )
    .unwrap();
    assert!(lark.starts_with("start: g_greet"), "{lark}");
    let pull = tok.encode("xyz", false).unwrap()[0];
    let text = decode(&c, &tok, &spec(GrammarKind::Lark, &lark), pull);
    let (greet, name) = text.split_once(' ').unwrap();
    assert!(greet == "hi" || greet == "yo", "{text}");
    assert!(name.ends_with('!') && name.len() >= 2, "{text}");
    assert!(
        name[..name.len() - 1]
            .chars()
            .all(|ch| ('a'..='c').contains(&ch)),
        "{text}"
    );
}

#[test]
fn gbnf_errors_name_the_problem() {
    assert!(
        gbnf_to_lark("root ::= \"a")
            .unwrap_err()
            .to_string()
            .contains("unterminated")
    );
    assert!(
        gbnf_to_lark("root ::= [a-z]{2,3}")
            .unwrap_err()
            .to_string()
            .contains("{m,n}")
    );
    assert!(
        gbnf_to_lark("# nothing")
            .unwrap_err()
            .to_string()
            .contains("no rule")
    );
}

#[test]
fn bad_and_oversized_grammars_are_refused() {
    let (_, c) = r1();
    let e = c
        .compile(&spec(GrammarKind::Regex, "(unclosed"))
        .unwrap_err();
    assert!(matches!(e, GrammarError::Invalid(_)), "{e}");
    let e = c
        .compile(&spec(GrammarKind::JsonSchema, "{not json"))
        .unwrap_err();
    assert!(e.to_string().contains("not JSON"), "{e}");
    let big = "a".repeat(GRAMMAR_SOURCE_BYTES_MAX + 1);
    let e = c.compile(&spec(GrammarKind::Regex, &big)).unwrap_err();
    assert!(matches!(e, GrammarError::TooLarge { .. }), "{e}");
}

#[test]
fn a_replayed_matcher_reaches_the_same_state() {
    // What crosses a PD handoff is the spec and the tokens: replaying them gives the same mask.
    let (tok, c) = r1();
    let s = spec(GrammarKind::Regex, "abc[0-9]+");
    let out = tok.encode("abc1", false).unwrap();
    let mut a = c.compile(&s).unwrap();
    for i in 1..=out.len() {
        a.advance(&out[..i]).unwrap();
    }
    let mut b = c.compile(&s).unwrap();
    b.advance(&out).unwrap();
    let vocab = tok.vocab_size();
    let (mut la, mut lb) = (vec![0.0; vocab], vec![0.0; vocab]);
    a.mask_logits(&mut la).unwrap();
    b.mask_logits(&mut lb).unwrap();
    assert_eq!(la, lb);
    // A token outside the grammar is refused.
    let x = tok.encode("x", false).unwrap();
    let mut bad = out.clone();
    bad.extend(x);
    assert!(matches!(b.advance(&bad), Err(GrammarError::Rejected(_))));
}
