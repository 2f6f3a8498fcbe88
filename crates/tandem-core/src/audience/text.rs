//! The text syntax of audience rules and computed traits: a lexer, a
//! recursive-descent parser that validates each part as it reads it, and the
//! printer ([`Condition`]'s `Display`) that writes a tree back so that it
//! parses to the same tree.
//!
//! ```text
//! rule      = and_rule { "or" and_rule }
//! and_rule  = unary { "and" unary }
//! unary     = "not" unary | "(" rule ")" | leaf
//! leaf      = "trait" NAME test | "computed" NAME test
//!           | "performed" EVENT [where] { "then" EVENT [where] } [window]
//!           | "count" "(" "event" EVENT [where] [ "," window ] ")" COMPARISON INTEGER
//!           | "in" "audience" TEXT
//! test      = ("=" | "!=" | "<" | "<=" | ">" | ">=" | "contains") VALUE | "exists"
//! where     = "where" NAME test { "and" NAME test }
//! window    = "within" LENGTH | "between" TIME "and" TIME
//! computed  = FUNCTION [ "(" NAME ")" ] "of" EVENT [where] [window]
//! ```
//!
//! NAME is a bare word (`plan`, `product.sku`) or a quoted text; EVENT and
//! TEXT are quoted (JSON string escapes); VALUE is a quoted text, a number,
//! `true` or `false`; LENGTH is `30d`, `12h` or `90m`; TIME is a date
//! (`2026-01-31`, midnight UTC) or an RFC 3339 time. Keywords ignore case.
//! Inside `where`, an `and` followed by `NAME OPERATOR` continues the filters;
//! otherwise it joins conditions — so the printer quotes names that are
//! keywords, which keeps `and trait "exists" exists` unambiguous.

use super::computed::{AggregateFunction, ComputedTraitDefinition};
use super::{
    check_filter, check_value_test, check_window, Comparison, Condition, CountCondition, EventCondition,
    FunnelCondition, FunnelStep, Operator, Problem, PropertyFilter, TimeUnit, ValueCondition, Window, WindowLength,
    MAX_DEPTH,
};
use chrono::{DateTime, NaiveDate, SecondsFormat, Timelike, Utc};
use regex::Regex;
use serde_json::{Number, Value};
use std::fmt;
use std::sync::LazyLock;

/// Words with a meaning in the syntax; a name spelled like one is quoted.
const KEYWORDS: [&str; 20] = [
    "and",
    "or",
    "not",
    "trait",
    "computed",
    "performed",
    "count",
    "event",
    "where",
    "within",
    "between",
    "then",
    "in",
    "audience",
    "contains",
    "exists",
    "true",
    "false",
    "null",
    "of",
];

const EXPECTED_OPERATOR: &str = "an operator (=, !=, <, <=, >, >=, contains, exists)";
const EXPECTED_COMPARISON: &str = "a comparison (=, !=, <, <=, >, >=)";
const EXPECTED_CONDITION: &str = "a condition (trait, computed, performed, count, in audience, not or a parenthesis)";

/// Text that is not a rule: where (1-based line and column, in characters,
/// and the byte offset) and what was wrong.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("at {}column {column}: {kind}", if *line > 1 { format!("line {line}, ") } else { String::new() })]
pub struct ParseError {
    pub offset: usize,
    pub line: usize,
    pub column: usize,
    pub kind: ParseErrorKind,
}

/// What a [`ParseError`] found wrong.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ParseErrorKind {
    /// The text does not follow the syntax.
    #[error("expected {expected}, found {found}")]
    Expected { expected: &'static str, found: String },
    /// The text follows the syntax but breaks a rule (an empty name, a
    /// window that is not positive).
    #[error("{0}")]
    Invalid(Problem),
}

/// Parses an audience rule.
pub fn parse_condition(text: &str) -> Result<Condition, ParseError> {
    let mut parser = Parser::new(text)?;
    let condition = parser.rule(0)?;
    parser.expect_end("and, or or the end of the rule")?;
    if let Err(invalid) = condition.validate() {
        // Only nesting depth is left to find here; leaves were checked as read.
        return Err(parser.error_at(0, ParseErrorKind::Invalid(invalid.problem)));
    }
    Ok(condition)
}

/// Parses a computed-trait definition.
pub fn parse_computed(text: &str) -> Result<ComputedTraitDefinition, ParseError> {
    let mut parser = Parser::new(text)?;
    let definition = parser.computed()?;
    parser.expect_end("where, within, between or the end of the definition")?;
    Ok(definition)
}

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Word(String),
    Text(String),
    Number(Number),
    Length(WindowLength),
    Time(DateTime<Utc>),
    /// `(`, `)` or `,`.
    Punct(char),
    /// A run of `=`, `!`, `<`, `>`; not necessarily a valid operator.
    Operator(String),
    End,
}

#[derive(Clone, Debug)]
struct Lexed {
    token: Token,
    start: usize,
    end: usize,
}

static WORD: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*").expect("valid pattern"));
static BARE_NAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*$").expect("valid pattern"));
static TIME: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^\d{4}-\d{2}-\d{2}(?:T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2}))?").expect("valid pattern")
});
static LENGTH: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^-?\d+[dhm]").expect("valid pattern"));
static NUMBER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?").expect("valid pattern"));

struct Parser<'a> {
    text: &'a str,
    tokens: Vec<Lexed>,
    next: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Result<Parser<'a>, ParseError> {
        let mut parser = Parser { text, tokens: Vec::new(), next: 0 };
        parser.lex()?;
        Ok(parser)
    }

    fn error_at(&self, offset: usize, kind: ParseErrorKind) -> ParseError {
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
        ParseError { offset, line, column: before[line_start..].chars().count() + 1, kind }
    }

    fn expected_at(&self, offset: usize, expected: &'static str, found: String) -> ParseError {
        self.error_at(offset, ParseErrorKind::Expected { expected, found })
    }

    fn lex(&mut self) -> Result<(), ParseError> {
        let text = self.text;
        let mut offset = 0;
        loop {
            let rest = &text[offset..];
            let trimmed = rest.trim_start();
            offset += rest.len() - trimmed.len();
            let start = offset;
            let Some(first) = trimmed.chars().next() else {
                self.tokens.push(Lexed { token: Token::End, start, end: start });
                return Ok(());
            };
            let followed_by_word = |length: usize| {
                trimmed[length..].chars().next().is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.')
            };
            let (token, length) = if let Some(found) = TIME.find(trimmed).filter(|m| !followed_by_word(m.end())) {
                (self.time(start, found.as_str())?, found.end())
            } else if let Some(found) = LENGTH.find(trimmed).filter(|m| !followed_by_word(m.end())) {
                let (digits, unit) = found.as_str().split_at(found.end() - 1);
                let unit = TimeUnit::from_suffix(unit.chars().next().unwrap_or('d')).unwrap_or(TimeUnit::Days);
                let amount = digits.parse().map_err(|_| {
                    self.expected_at(start, "a window no longer than ten years", format!("{:?}", found.as_str()))
                })?;
                (Token::Length(WindowLength { amount, unit }), found.end())
            } else if let Some(found) = NUMBER.find(trimmed) {
                let number = serde_json::from_str(found.as_str())
                    .map_err(|_| self.expected_at(start, "a number", format!("{:?}", found.as_str())))?;
                (Token::Number(number), found.end())
            } else if let Some(found) = WORD.find(trimmed) {
                (Token::Word(found.as_str().to_owned()), found.end())
            } else if first == '"' {
                let length = quoted_length(trimmed).ok_or_else(|| {
                    self.expected_at(start + trimmed.len(), "a closing quote (\")", "the end of the rule".into())
                })?;
                let value = serde_json::from_str(&trimmed[..length])
                    .map_err(|_| self.expected_at(start, "a text with JSON escapes", trimmed[..length].to_owned()))?;
                (Token::Text(value), length)
            } else if matches!(first, '(' | ')' | ',') {
                (Token::Punct(first), 1)
            } else if matches!(first, '=' | '!' | '<' | '>') {
                let length = trimmed.find(|c| !matches!(c, '=' | '!' | '<' | '>')).unwrap_or(trimmed.len());
                (Token::Operator(trimmed[..length].to_owned()), length)
            } else {
                return Err(self.expected_at(
                    start,
                    "a word, a quoted text, a number or an operator",
                    format!("{first:?}"),
                ));
            };
            offset += length;
            self.tokens.push(Lexed { token, start, end: offset });
        }
    }

    fn time(&self, start: usize, text: &str) -> Result<Token, ParseError> {
        let time = if text.len() == 10 {
            NaiveDate::parse_from_str(text, "%Y-%m-%d")
                .ok()
                .and_then(|date| date.and_hms_opt(0, 0, 0))
                .map(|t| t.and_utc())
        } else {
            DateTime::parse_from_rfc3339(text).ok().map(|time| time.with_timezone(&Utc))
        };
        time.map(Token::Time).ok_or_else(|| self.expected_at(start, "a date such as 2026-01-31", format!("{text:?}")))
    }

    fn peek(&self) -> &Lexed {
        &self.tokens[self.next.min(self.tokens.len() - 1)]
    }

    fn peek_at(&self, ahead: usize) -> &Token {
        &self.tokens[(self.next + ahead).min(self.tokens.len() - 1)].token
    }

    fn advance(&mut self) -> Lexed {
        let lexed = self.peek().clone();
        if lexed.token != Token::End {
            self.next += 1;
        }
        lexed
    }

    fn found(&self, lexed: &Lexed) -> String {
        match lexed.token {
            Token::End => "the end of the rule".into(),
            _ => format!("{:?}", &self.text[lexed.start..lexed.end]),
        }
    }

    fn unexpected(&self, expected: &'static str) -> ParseError {
        let lexed = self.peek();
        self.expected_at(lexed.start, expected, self.found(lexed))
    }

    fn at_keyword(&self, keyword: &str) -> bool {
        is_keyword(&self.peek().token, keyword)
    }

    fn eat_keyword(&mut self, keyword: &str) -> bool {
        let found = self.at_keyword(keyword);
        if found {
            self.advance();
        }
        found
    }

    fn expect_keyword(&mut self, keyword: &str, expected: &'static str) -> Result<(), ParseError> {
        if self.eat_keyword(keyword) {
            Ok(())
        } else {
            Err(self.unexpected(expected))
        }
    }

    fn expect_punct(&mut self, punct: char, expected: &'static str) -> Result<(), ParseError> {
        if self.peek().token == Token::Punct(punct) {
            self.advance();
            Ok(())
        } else {
            Err(self.unexpected(expected))
        }
    }

    fn expect_end(&self, expected: &'static str) -> Result<(), ParseError> {
        match self.peek().token {
            Token::End => Ok(()),
            _ => Err(self.unexpected(expected)),
        }
    }

    fn invalid(&self, offset: usize, problem: Problem) -> ParseError {
        self.error_at(offset, ParseErrorKind::Invalid(problem))
    }

    fn rule(&mut self, depth: usize) -> Result<Condition, ParseError> {
        let mut alternatives = vec![self.and_rule(depth)?];
        while self.eat_keyword("or") {
            alternatives.push(self.and_rule(depth)?);
        }
        Ok(if alternatives.len() == 1 { alternatives.remove(0) } else { Condition::Or { conditions: alternatives } })
    }

    fn and_rule(&mut self, depth: usize) -> Result<Condition, ParseError> {
        let mut all = vec![self.unary(depth)?];
        while self.eat_keyword("and") {
            all.push(self.unary(depth)?);
        }
        Ok(if all.len() == 1 { all.remove(0) } else { Condition::And { conditions: all } })
    }

    fn unary(&mut self, depth: usize) -> Result<Condition, ParseError> {
        if depth > MAX_DEPTH {
            let start = self.peek().start;
            return Err(self.invalid(start, Problem::TooDeep));
        }
        if self.eat_keyword("not") {
            return Ok(Condition::Not { condition: Box::new(self.unary(depth + 1)?) });
        }
        if self.peek().token == Token::Punct('(') {
            self.advance();
            let condition = self.rule(depth + 1)?;
            self.expect_punct(')', "and, or or a closing parenthesis")?;
            return Ok(condition);
        }
        self.leaf()
    }

    fn leaf(&mut self) -> Result<Condition, ParseError> {
        if self.eat_keyword("trait") {
            return Ok(Condition::Trait(self.value_condition()?));
        }
        if self.eat_keyword("computed") {
            return Ok(Condition::ComputedTrait(self.value_condition()?));
        }
        if self.eat_keyword("in") {
            self.expect_keyword("audience", "audience")?;
            let name_start = self.peek().start;
            let audience = self.text_literal("a quoted audience name")?;
            if audience.trim().is_empty() {
                return Err(self.invalid(name_start, Problem::EmptyName("audience")));
            }
            return Ok(Condition::InAudience { audience });
        }
        if self.eat_keyword("performed") {
            let (event, filters) = self.event_and_filters()?;
            let mut steps = vec![FunnelStep { event, filters }];
            while self.eat_keyword("then") {
                let (event, filters) = self.event_and_filters()?;
                steps.push(FunnelStep { event, filters });
            }
            let window = self.optional_window()?;
            return Ok(if steps.len() == 1 {
                let FunnelStep { event, filters } = steps.remove(0);
                Condition::Performed(EventCondition { event, filters, window })
            } else {
                Condition::Funnel(FunnelCondition { steps, window })
            });
        }
        if self.eat_keyword("count") {
            self.expect_punct('(', "an opening parenthesis")?;
            self.expect_keyword("event", "event")?;
            let (event, filters) = self.event_and_filters()?;
            let window = if self.peek().token == Token::Punct(',') {
                self.advance();
                Some(self.window()?)
            } else {
                None
            };
            self.expect_punct(')', "a comma and a window, or a closing parenthesis")?;
            let operator = self.comparison()?;
            let value = match self.peek().token.clone() {
                Token::Number(number) if number.as_u64().is_some() => {
                    self.advance();
                    number.as_u64().unwrap_or_default()
                }
                _ => return Err(self.unexpected("a whole number of events")),
            };
            return Ok(Condition::Count(CountCondition { event, filters, window, operator, value }));
        }
        Err(self.unexpected(EXPECTED_CONDITION))
    }

    fn value_condition(&mut self) -> Result<ValueCondition, ParseError> {
        let start = self.peek().start;
        let name = self.name("a trait name")?;
        let (operator, value) = self.test()?;
        check_value_test("trait", &name, operator, value.as_ref()).map_err(|problem| self.invalid(start, problem))?;
        Ok(ValueCondition { name, operator, value })
    }

    fn name(&mut self, expected: &'static str) -> Result<String, ParseError> {
        match self.peek().token.clone() {
            Token::Word(word) | Token::Text(word) => {
                self.advance();
                Ok(word)
            }
            _ => Err(self.unexpected(expected)),
        }
    }

    fn text_literal(&mut self, expected: &'static str) -> Result<String, ParseError> {
        match self.peek().token.clone() {
            Token::Text(text) => {
                self.advance();
                Ok(text)
            }
            _ => Err(self.unexpected(expected)),
        }
    }

    fn test(&mut self) -> Result<(Operator, Option<Value>), ParseError> {
        let operator = match &self.peek().token {
            Token::Operator(text) => Operator::ALL
                .into_iter()
                .find(|operator| operator.as_str() == text)
                .ok_or_else(|| self.unexpected(EXPECTED_OPERATOR))?,
            token if is_keyword(token, "contains") => Operator::Contains,
            token if is_keyword(token, "exists") => Operator::Exists,
            _ => return Err(self.unexpected(EXPECTED_OPERATOR)),
        };
        self.advance();
        if operator == Operator::Exists {
            return Ok((operator, None));
        }
        let value = match self.peek().token.clone() {
            Token::Text(text) => Value::String(text),
            Token::Number(number) => Value::Number(number),
            ref token if is_keyword(token, "true") => Value::Bool(true),
            ref token if is_keyword(token, "false") => Value::Bool(false),
            ref token if is_keyword(token, "null") => Value::Null,
            _ => return Err(self.unexpected("a value (a quoted text, a number, true or false)")),
        };
        self.advance();
        Ok((operator, Some(value)))
    }

    fn comparison(&mut self) -> Result<Comparison, ParseError> {
        let comparison = match &self.peek().token {
            Token::Operator(text) => Comparison::ALL.into_iter().find(|comparison| comparison.as_str() == text),
            _ => None,
        };
        let comparison = comparison.ok_or_else(|| self.unexpected(EXPECTED_COMPARISON))?;
        self.advance();
        Ok(comparison)
    }

    /// `"Event Name" [where NAME test {and NAME test}]`
    fn event_and_filters(&mut self) -> Result<(String, Vec<PropertyFilter>), ParseError> {
        let start = self.peek().start;
        let event = self.text_literal("a quoted event name")?;
        if event.trim().is_empty() {
            return Err(self.invalid(start, Problem::EmptyName("event")));
        }
        let mut filters = Vec::new();
        if self.eat_keyword("where") {
            filters.push(self.filter()?);
            while self.at_keyword("and") && self.filter_follows_and() {
                self.advance();
                filters.push(self.filter()?);
            }
        }
        Ok((event, filters))
    }

    /// Whether the `and` at hand continues the filters: `and NAME OPERATOR`.
    fn filter_follows_and(&self) -> bool {
        let name = matches!(self.peek_at(1), Token::Word(_) | Token::Text(_));
        let operator = match self.peek_at(2) {
            Token::Operator(_) => true,
            token => is_keyword(token, "contains") || is_keyword(token, "exists"),
        };
        name && operator
    }

    fn filter(&mut self) -> Result<PropertyFilter, ParseError> {
        let start = self.peek().start;
        let property = self.name("a property name")?;
        let (operator, value) = self.test()?;
        let filter = PropertyFilter { property, operator, value };
        check_filter(&filter).map_err(|problem| self.invalid(start, problem))?;
        Ok(filter)
    }

    fn optional_window(&mut self) -> Result<Option<Window>, ParseError> {
        if self.at_keyword("within") || self.at_keyword("between") {
            Ok(Some(self.window()?))
        } else {
            Ok(None)
        }
    }

    fn window(&mut self) -> Result<Window, ParseError> {
        let start = self.peek().start;
        let window = if self.eat_keyword("within") {
            match self.peek().token.clone() {
                Token::Length(length) => {
                    self.advance();
                    Window::Within(length)
                }
                _ => return Err(self.unexpected("a window length such as 30d, 12h or 90m")),
            }
        } else if self.eat_keyword("between") {
            let start = self.time_literal()?;
            self.expect_keyword("and", "and")?;
            let end = self.time_literal()?;
            Window::Between { start, end }
        } else {
            return Err(self.unexpected("a window (within or between)"));
        };
        check_window(Some(&window)).map_err(|problem| self.invalid(start, problem))?;
        Ok(window)
    }

    fn time_literal(&mut self) -> Result<DateTime<Utc>, ParseError> {
        match self.peek().token {
            Token::Time(time) => {
                self.advance();
                Ok(time)
            }
            _ => Err(self.unexpected("a date such as 2026-01-31")),
        }
    }

    /// `FUNCTION [(NAME)] of "Event" [where …] [window]`
    fn computed(&mut self) -> Result<ComputedTraitDefinition, ParseError> {
        let start = self.peek().start;
        let function = match &self.peek().token {
            Token::Word(word) => AggregateFunction::ALL.into_iter().find(|f| f.as_str().eq_ignore_ascii_case(word)),
            _ => None,
        };
        let function = function.ok_or_else(|| {
            self.unexpected(
                "a function (count, sum, average, min, max, most_frequent, first, last, unique_list, unique_count)",
            )
        })?;
        self.advance();
        let property = if self.peek().token == Token::Punct('(') {
            self.advance();
            let property = self.name("a property name")?;
            self.expect_punct(')', "a closing parenthesis")?;
            Some(property)
        } else {
            None
        };
        self.expect_keyword("of", if property.is_some() { "of" } else { "an opening parenthesis or of" })?;
        let (event, filters) = self.event_and_filters()?;
        let window = self.optional_window()?;
        let definition = ComputedTraitDefinition { function, property, event, filters, window };
        definition.validate().map_err(|problem| self.invalid(start, problem))?;
        Ok(definition)
    }
}

/// The byte length of the quoted text `text` starts with, quotes included.
fn quoted_length(text: &str) -> Option<usize> {
    let mut escaped = false;
    for (index, c) in text.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some(index + 1),
            _ => {}
        }
    }
    None
}

fn is_keyword(token: &Token, keyword: &str) -> bool {
    matches!(token, Token::Word(word) if word.eq_ignore_ascii_case(keyword))
}

/// Writes a name bare when it reads back as one word that is no keyword,
/// quoted otherwise.
fn write_name(f: &mut fmt::Formatter<'_>, name: &str) -> fmt::Result {
    let keyword = KEYWORDS.iter().any(|keyword| keyword.eq_ignore_ascii_case(name));
    if BARE_NAME.is_match(name) && !keyword {
        f.write_str(name)
    } else {
        write_text(f, name)
    }
}

fn write_text(f: &mut fmt::Formatter<'_>, text: &str) -> fmt::Result {
    f.write_str(&Value::String(text.to_owned()).to_string())
}

fn write_test(f: &mut fmt::Formatter<'_>, operator: Operator, value: Option<&Value>) -> fmt::Result {
    match value {
        Some(value) => write!(f, " {operator} {value}"),
        None => write!(f, " {operator}"),
    }
}

fn write_filters(f: &mut fmt::Formatter<'_>, filters: &[PropertyFilter]) -> fmt::Result {
    for (index, filter) in filters.iter().enumerate() {
        f.write_str(if index == 0 { " where " } else { " and " })?;
        write_name(f, &filter.property)?;
        write_test(f, filter.operator, filter.value.as_ref())?;
    }
    Ok(())
}

fn write_time(f: &mut fmt::Formatter<'_>, time: &DateTime<Utc>) -> fmt::Result {
    if time.num_seconds_from_midnight() == 0 && time.nanosecond() == 0 {
        write!(f, "{}", time.format("%Y-%m-%d"))
    } else {
        f.write_str(&time.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }
}

/// ` within 30d` or ` between … and …`.
pub(crate) fn write_window(f: &mut fmt::Formatter<'_>, window: &Window) -> fmt::Result {
    match window {
        Window::Within(length) => write!(f, "within {length}"),
        Window::Between { start, end } => {
            f.write_str("between ")?;
            write_time(f, start)?;
            f.write_str(" and ")?;
            write_time(f, end)
        }
    }
}

/// Writes `"Event" where …` for computed traits and conditions alike.
pub(crate) fn write_event(f: &mut fmt::Formatter<'_>, event: &str, filters: &[PropertyFilter]) -> fmt::Result {
    write_text(f, event)?;
    write_filters(f, filters)
}

pub(crate) fn write_computed(f: &mut fmt::Formatter<'_>, definition: &ComputedTraitDefinition) -> fmt::Result {
    f.write_str(definition.function.as_str())?;
    if let Some(property) = &definition.property {
        f.write_str("(")?;
        write_name(f, property)?;
        f.write_str(")")?;
    }
    f.write_str(" of ")?;
    write_event(f, &definition.event, &definition.filters)?;
    if let Some(window) = &definition.window {
        f.write_str(" ")?;
        write_window(f, window)?;
    }
    Ok(())
}

pub(crate) fn write_condition(f: &mut fmt::Formatter<'_>, condition: &Condition) -> fmt::Result {
    let nested = |f: &mut fmt::Formatter<'_>, child: &Condition, parenthesize: bool| {
        if parenthesize {
            f.write_str("(")?;
            write_condition(f, child)?;
            f.write_str(")")
        } else {
            write_condition(f, child)
        }
    };
    match condition {
        Condition::Or { conditions } => {
            for (index, child) in conditions.iter().enumerate() {
                if index > 0 {
                    f.write_str(" or ")?;
                }
                nested(f, child, matches!(child, Condition::Or { .. }))?;
            }
            Ok(())
        }
        Condition::And { conditions } => {
            for (index, child) in conditions.iter().enumerate() {
                if index > 0 {
                    f.write_str(" and ")?;
                }
                nested(f, child, matches!(child, Condition::Or { .. } | Condition::And { .. }))?;
            }
            Ok(())
        }
        Condition::Not { condition: child } => {
            f.write_str("not ")?;
            nested(f, child, matches!(**child, Condition::Or { .. } | Condition::And { .. }))
        }
        Condition::Trait(test) | Condition::ComputedTrait(test) => {
            f.write_str(if matches!(condition, Condition::Trait(_)) { "trait " } else { "computed " })?;
            write_name(f, &test.name)?;
            write_test(f, test.operator, test.value.as_ref())
        }
        Condition::Performed(performed) => {
            f.write_str("performed ")?;
            write_event(f, &performed.event, &performed.filters)?;
            if let Some(window) = &performed.window {
                f.write_str(" ")?;
                write_window(f, window)?;
            }
            Ok(())
        }
        Condition::Count(count) => {
            f.write_str("count(event ")?;
            write_event(f, &count.event, &count.filters)?;
            if let Some(window) = &count.window {
                f.write_str(", ")?;
                write_window(f, window)?;
            }
            write!(f, ") {} {}", count.operator, count.value)
        }
        Condition::Funnel(funnel) => {
            f.write_str("performed ")?;
            for (index, step) in funnel.steps.iter().enumerate() {
                if index > 0 {
                    f.write_str(" then ")?;
                }
                write_event(f, &step.event, &step.filters)?;
            }
            if let Some(window) = &funnel.window {
                f.write_str(" ")?;
                write_window(f, window)?;
            }
            Ok(())
        }
        Condition::InAudience { audience } => {
            f.write_str("in audience ")?;
            write_text(f, audience)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn parse(text: &str) -> Condition {
        Condition::parse(text).unwrap_or_else(|error| panic!("{text}: {error}"))
    }

    fn error(text: &str) -> String {
        Condition::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn the_briefs_examples_parse_to_the_expected_trees() {
        let rule = parse(
            r#"trait plan = "pro" and count(event "Order Completed" where total > 50, within 30d) >= 3
               and not performed "Ticket Opened" within 7d"#,
        );
        let expected = json!({"kind": "and", "conditions": [
            {"kind": "trait", "name": "plan", "operator": "=", "value": "pro"},
            {"kind": "count", "event": "Order Completed",
             "where": [{"property": "total", "operator": ">", "value": 50}],
             "window": {"within": {"amount": 30, "unit": "days"}}, "operator": ">=", "value": 3},
            {"kind": "not", "condition": {"kind": "performed", "event": "Ticket Opened",
             "window": {"within": {"amount": 7, "unit": "days"}}}}
        ]});
        assert_eq!(serde_json::to_value(&rule).unwrap(), expected);

        let funnel = parse(r#"performed "Product Viewed" where category = "shoes" then "Order Completed" within 7d"#);
        let Condition::Funnel(funnel) = funnel else { panic!("not a funnel: {funnel:?}") };
        assert_eq!(funnel.steps.len(), 2);
        assert_eq!(funnel.steps[0].filters.len(), 1);
        assert_eq!(funnel.window, Some(Window::Within(WindowLength { amount: 7, unit: TimeUnit::Days })));

        let between = parse(r#"performed "A" between 2026-01-01 and 2026-02-01T12:30:00+01:00"#);
        let Condition::Performed(EventCondition { window: Some(Window::Between { start, end }), .. }) = between else {
            panic!("no between window")
        };
        assert_eq!(start.to_rfc3339(), "2026-01-01T00:00:00+00:00");
        assert_eq!(end.to_rfc3339(), "2026-02-01T11:30:00+00:00");
    }

    #[test]
    fn precedence_is_not_then_and_then_or() {
        let rule = parse(r#"not in audience "a" and in audience "b" or in audience "c""#);
        assert_eq!(rule.to_string(), r#"not in audience "a" and in audience "b" or in audience "c""#);
        let Condition::Or { conditions } = &rule else { panic!("{rule:?}") };
        let Condition::And { conditions: both } = &conditions[0] else { panic!("{rule:?}") };
        assert!(matches!(both[0], Condition::Not { .. }));
        let grouped = parse(r#"not (in audience "a" and (in audience "b" OR in audience "c"))"#);
        assert_eq!(grouped.to_string(), r#"not (in audience "a" and (in audience "b" or in audience "c"))"#);
    }

    #[test]
    fn an_and_after_filters_joins_conditions_unless_a_filter_follows() {
        let rule = parse(r#"performed "A" where x = 1 and y exists and trait "exists" exists"#);
        let Condition::And { conditions } = &rule else { panic!("{rule:?}") };
        let Condition::Performed(performed) = &conditions[0] else { panic!("{rule:?}") };
        assert_eq!(performed.filters.len(), 2);
        assert_eq!(
            conditions[1],
            Condition::Trait(ValueCondition { name: "exists".into(), operator: Operator::Exists, value: None })
        );
    }

    #[test]
    fn errors_say_where_and_what_was_expected() {
        assert_eq!(
            error(r#"count(event "A") => 3"#),
            r#"at column 18: expected a comparison (=, !=, <, <=, >, >=), found "=>""#
        );
        assert_eq!(
            error(r#"trait plan is "pro""#),
            r#"at column 12: expected an operator (=, !=, <, <=, >, >=, contains, exists), found "is""#
        );
        assert_eq!(error(r#"performed "A" within -3d"#), "at column 15: window must be positive, got -3d");
        assert_eq!(
            error(r#"performed "A" within 3w"#),
            r#"at column 22: expected a window length such as 30d, 12h or 90m, found "3""#
        );
        assert_eq!(error(r#"performed "A" within 0d"#), "at column 15: window must be positive, got 0d");
        assert_eq!(error(r#"performed """#), "at column 11: empty event name");
        assert_eq!(
            error("trait plan = \"pro\"\n  or"),
            r#"at line 2, column 5: expected a condition (trait, computed, performed, count, in audience, not or a parenthesis), found the end of the rule"#
        );
        assert_eq!(
            error(r#"(in audience "a""#),
            r#"at column 17: expected and, or or a closing parenthesis, found the end of the rule"#
        );
        assert_eq!(
            error(r#"trait plan = "pro"#),
            r#"at column 18: expected a closing quote ("), found the end of the rule"#
        );
        assert_eq!(
            error("trait plan = pro"),
            r#"at column 14: expected a value (a quoted text, a number, true or false), found "pro""#
        );
        assert_eq!(error("trait plan < true"), "at column 7: < needs a number or a text, got true");
        assert_eq!(error("trait plan = null"), "at column 7: = needs a text, a number or true or false, got null");
        assert_eq!(
            error("trait plan exists @"),
            r#"at column 19: expected a word, a quoted text, a number or an operator, found '@'"#
        );
        assert_eq!(error(r#"performed "A" between 2026-02-01 and 2026-01-01"#).split(':').next(), Some("at column 15"));
        assert_eq!(
            error(r#"performed "A" between 2026-13-01 and 2026-01-01"#),
            r#"at column 23: expected a date such as 2026-01-31, found "2026-13-01""#
        );
        assert_eq!(
            error(r#"count(event "A") >= 1.5"#),
            r#"at column 21: expected a whole number of events, found "1.5""#
        );
        let deep = format!("{}in audience \"a\"", "not ".repeat(MAX_DEPTH + 2));
        assert!(error(&deep).ends_with("rule nested deeper than 32 levels"), "{}", error(&deep));
    }

    #[test]
    fn names_that_are_keywords_or_not_words_are_quoted() {
        let rule = Condition::Trait(ValueCondition {
            name: "first name".into(),
            operator: Operator::Equal,
            value: Some(json!("Ann")),
        });
        assert_eq!(rule.to_string(), r#"trait "first name" = "Ann""#);
        let rule = parse(r#"performed "A" where "and" = 1 and product.sku contains "x""#);
        assert_eq!(rule.to_string(), r#"performed "A" where "and" = 1 and product.sku contains "x""#);
    }

    // Random valid trees, shared with the evaluator's property tests.
    pub(crate) fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => prop::sample::select(vec!["plan", "age", "tags", "total", "product.sku"]).prop_map(str::to_owned),
            1 => prop::sample::select(vec!["exists", "and", "first name", "then", "Ünïcode \"q\""]).prop_map(str::to_owned),
        ]
    }

    pub(crate) fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            prop::sample::select(vec!["pro", "free", "vip", "a b", "p"]).prop_map(|s| json!(s)),
            (-3i64..60).prop_map(|n| json!(n)),
            (-6i64..120).prop_map(|n| json!(n as f64 / 2.0)),
            any::<bool>().prop_map(Value::Bool),
        ]
    }

    pub(crate) fn test_and_value() -> impl Strategy<Value = (Operator, Option<Value>)> {
        (prop::sample::select(Operator::ALL.to_vec()), value()).prop_map(|(operator, value)| match (operator, value) {
            (Operator::Exists, _) => (operator, None),
            (operator, Value::Bool(_)) if operator.is_ordering() => (operator, Some(json!(10))),
            (operator, value) => (operator, Some(value)),
        })
    }

    pub(crate) fn filters() -> impl Strategy<Value = Vec<PropertyFilter>> {
        prop::collection::vec(
            (prop::sample::select(vec!["total", "currency", "product.sku", "exists"]), test_and_value()).prop_map(
                |(property, (operator, value))| PropertyFilter { property: property.into(), operator, value },
            ),
            0..3,
        )
    }

    pub(crate) fn window() -> impl Strategy<Value = Option<Window>> {
        prop_oneof![
            Just(None),
            (1i64..6, prop::sample::select(vec![TimeUnit::Minutes, TimeUnit::Hours, TimeUnit::Days]))
                .prop_map(|(amount, unit)| Some(Window::Within(WindowLength { amount, unit }))),
            (0i64..200, 1i64..200).prop_map(|(start, length)| {
                let base = DateTime::from_timestamp(1_767_225_600, 0).expect("2026-01-01");
                Some(Window::Between {
                    start: base + chrono::Duration::hours(start),
                    end: base + chrono::Duration::hours(start + length),
                })
            }),
        ]
    }

    pub(crate) fn event_name() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["Order Completed", "Ticket Opened", "Product Viewed"]).prop_map(str::to_owned)
    }

    pub(crate) fn leaf() -> impl Strategy<Value = Condition> {
        prop_oneof![
            (name(), test_and_value()).prop_map(|(name, (operator, value))| Condition::Trait(ValueCondition {
                name,
                operator,
                value
            })),
            (name(), test_and_value()).prop_map(|(name, (operator, value))| Condition::ComputedTrait(ValueCondition {
                name,
                operator,
                value
            })),
            (event_name(), filters(), window())
                .prop_map(|(event, filters, window)| Condition::Performed(EventCondition { event, filters, window })),
            (event_name(), filters(), window(), prop::sample::select(Comparison::ALL.to_vec()), 0u64..4).prop_map(
                |(event, filters, window, operator, value)| Condition::Count(CountCondition {
                    event,
                    filters,
                    window,
                    operator,
                    value
                })
            ),
            (prop::collection::vec((event_name(), filters()), 2..4), window()).prop_map(|(steps, window)| {
                let steps = steps.into_iter().map(|(event, filters)| FunnelStep { event, filters }).collect();
                Condition::Funnel(FunnelCondition { steps, window })
            }),
            prop::sample::select(vec!["vip", "churned", "and"])
                .prop_map(|audience| Condition::InAudience { audience: audience.into() }),
        ]
    }

    pub(crate) fn condition() -> impl Strategy<Value = Condition> {
        leaf().prop_recursive(4, 24, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 2..4).prop_map(|conditions| Condition::And { conditions }),
                prop::collection::vec(inner.clone(), 2..4).prop_map(|conditions| Condition::Or { conditions }),
                inner.prop_map(|condition| Condition::Not { condition: Box::new(condition) }),
            ]
        })
    }

    proptest! {
        #[test]
        fn text_and_tree_round_trip(condition in condition()) {
            condition.validate().unwrap();
            let text = condition.to_string();
            let parsed = Condition::parse(&text).map_err(|error| TestCaseError::fail(format!("{text}: {error}")))?;
            prop_assert_eq!(&parsed, &condition, "{}", text);
            prop_assert_eq!(parsed.to_string(), text);
            let json = serde_json::to_string(&condition).unwrap();
            prop_assert_eq!(serde_json::from_str::<Condition>(&json).unwrap(), condition);
        }

        #[test]
        fn any_text_parses_or_fails_with_a_position_inside_it(text in "[a-zé€\"()=<>!,. 0-9-]{0,40}") {
            match Condition::parse(&text) {
                Ok(condition) => prop_assert_eq!(Condition::parse(&condition.to_string()).unwrap(), condition),
                Err(error) => prop_assert!(error.offset <= text.len()),
            }
            let definition = format!("sum(total) of {text}");
            match ComputedTraitDefinition::parse(&definition) {
                Ok(parsed) => prop_assert_eq!(ComputedTraitDefinition::parse(&parsed.to_string()).unwrap(), parsed),
                Err(error) => prop_assert!(error.offset <= definition.len()),
            }
        }
    }
}
