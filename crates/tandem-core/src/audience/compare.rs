//! How a value test (`= "pro"`, `> 50`, `contains "vip"`, `exists`), a
//! property filter and an event matcher decide, in their compiled form —
//! shared by audiences and computed traits so both read events alike.
//!
//! The semantics, in one place:
//! - numbers compare as numbers (`30` equals `30.0`), texts by their UTF-8
//!   bytes, and an ordering between a number and a text is false;
//! - every test but `exists` is false when the value is missing or `null`,
//!   so `trait plan != "pro"` holds only for profiles that have a plan
//!   (`not trait plan = "pro"` holds for those without one too);
//! - `contains` is a substring test on text and a membership test on lists.

use super::{Operator, PropertyFilter};
use crate::event::{Event, EventType};
use serde_json::{Map, Value};

/// An operator and its value, ready to test.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ValueTest {
    pub operator: Operator,
    pub value: Value,
}

impl ValueTest {
    pub fn new(operator: Operator, value: Option<&Value>) -> ValueTest {
        ValueTest { operator, value: value.cloned().unwrap_or(Value::Null) }
    }

    /// Whether `actual` (`None` when absent) passes the test.
    pub fn passes(&self, actual: Option<&Value>) -> bool {
        let Some(actual) = actual.filter(|value| !value.is_null()) else {
            return false;
        };
        let expected = &self.value;
        match self.operator {
            Operator::Exists => true,
            Operator::Equal => values_equal(actual, expected),
            Operator::NotEqual => !values_equal(actual, expected),
            Operator::Less => ordering(actual, expected).is_some_and(|o| o.is_lt()),
            Operator::LessOrEqual => ordering(actual, expected).is_some_and(|o| o.is_le()),
            Operator::Greater => ordering(actual, expected).is_some_and(|o| o.is_gt()),
            Operator::GreaterOrEqual => ordering(actual, expected).is_some_and(|o| o.is_ge()),
            Operator::Contains => match (actual, expected) {
                (Value::String(text), Value::String(part)) => text.contains(part.as_str()),
                (Value::Array(items), _) => items.iter().any(|item| values_equal(item, expected)),
                _ => false,
            },
        }
    }
}

/// JSON equality, except that numbers compare by value.
pub(crate) fn values_equal(left: &Value, right: &Value) -> bool {
    match (left, right) {
        (Value::Number(left), Value::Number(right)) => left.as_f64() == right.as_f64(),
        _ => left == right,
    }
}

fn ordering(left: &Value, right: &Value) -> Option<std::cmp::Ordering> {
    match (left, right) {
        (Value::Number(left), Value::Number(right)) => left.as_f64()?.partial_cmp(&right.as_f64()?),
        (Value::String(left), Value::String(right)) => Some(left.cmp(right)),
        _ => None,
    }
}

/// A property filter with its path split.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct CompiledFilter {
    pub path: Vec<String>,
    pub test: ValueTest,
}

impl CompiledFilter {
    pub fn new(filter: &PropertyFilter) -> CompiledFilter {
        CompiledFilter {
            path: filter.property.split('.').map(str::to_owned).collect(),
            test: ValueTest::new(filter.operator, filter.value.as_ref()),
        }
    }

    pub fn passes(&self, properties: Option<&Map<String, Value>>) -> bool {
        self.test.passes(property(properties, &self.path))
    }
}

/// The value at a dotted path in an event's properties.
pub(crate) fn property<'a>(properties: Option<&'a Map<String, Value>>, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let mut value = properties?.get(first)?;
    for key in rest {
        value = value.as_object()?.get(key)?;
    }
    Some(value)
}

/// Which events a condition is about: `track` events of one name whose
/// properties pass every filter.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct EventMatcher {
    pub event: String,
    pub filters: Vec<CompiledFilter>,
}

impl EventMatcher {
    pub fn new(event: &str, filters: &[PropertyFilter]) -> EventMatcher {
        EventMatcher { event: event.to_owned(), filters: filters.iter().map(CompiledFilter::new).collect() }
    }

    pub fn matches(&self, event: &Event) -> bool {
        event.event_type == EventType::Track
            && event.event.as_deref() == Some(self.event.as_str())
            && self.filters.iter().all(|filter| filter.passes(event.properties.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn test(operator: Operator, value: Value) -> ValueTest {
        ValueTest::new(operator, Some(&value))
    }

    #[test]
    fn numbers_compare_by_value_and_texts_by_bytes() {
        assert!(test(Operator::Equal, json!(30)).passes(Some(&json!(30.0))));
        assert!(test(Operator::GreaterOrEqual, json!(30)).passes(Some(&json!(31))));
        assert!(!test(Operator::Greater, json!(30)).passes(Some(&json!("31"))), "a text is no number");
        assert!(test(Operator::Less, json!("2026-02-01")).passes(Some(&json!("2026-01-15"))));
        assert!(!test(Operator::Equal, json!("Pro")).passes(Some(&json!("pro"))));
    }

    #[test]
    fn missing_and_null_values_pass_no_test() {
        for operator in Operator::ALL {
            let check = test(operator, json!("pro"));
            assert!(!check.passes(None), "{operator}");
            assert!(!check.passes(Some(&Value::Null)), "{operator}");
        }
        assert!(ValueTest::new(Operator::Exists, None).passes(Some(&json!(false))));
        assert!(test(Operator::NotEqual, json!("pro")).passes(Some(&json!("free"))));
    }

    #[test]
    fn contains_looks_into_texts_and_lists() {
        let contains = |value: Value, actual: Value| test(Operator::Contains, value).passes(Some(&actual));
        assert!(contains(json!("vip"), json!("a vip customer")));
        assert!(contains(json!("vip"), json!(["new", "vip"])));
        assert!(contains(json!(3), json!([1, 3.0])));
        assert!(!contains(json!("vip"), json!(["v", "ip"])));
        assert!(!contains(json!(3), json!(33)));
    }

    #[test]
    fn properties_are_read_by_dotted_paths() {
        let properties = json!({"product": {"sku": "A-1"}, "total": 5}).as_object().cloned();
        let path = |text: &str| text.split('.').map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(property(properties.as_ref(), &path("product.sku")), Some(&json!("A-1")));
        assert_eq!(property(properties.as_ref(), &path("total.value")), None);
        assert_eq!(property(None, &path("total")), None);
    }
}
