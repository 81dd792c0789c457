//! The JSON API behind the page: the rules file (read, add, edit, delete, guarded by ETag /
//! If-Match), the live figures, the per-second history and the connection table. Every change
//! goes through `Supervisor::write_entries` (`rules::file`), which writes only the rules file.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};

use super::entries::{self, Change, FieldError};
use super::{call, AppState};
use crate::control::ConnectionInfo;
use crate::rules::file::{Snapshot, WriteError};
use crate::rules::options::Admin;
use crate::rules::{self, Entry, Proto, RuleError};
use crate::stats::snapshot::StatsSnapshot;
use crate::supervisor::Supervisor;

/// An error answer: a status and `{"error": "...", ...}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    body: Value,
    etag: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: json!({ "error": message.into() }),
            etag: None,
        }
    }

    /// 400 with each problem's field, so the page can show it next to the input.
    pub fn invalid(message: impl Into<String>, errors: Vec<FieldError>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            body: json!({ "error": message.into(), "errors": errors }),
            etag: None,
        }
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::FORBIDDEN, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    fn stale(current: String) -> ApiError {
        ApiError {
            status: StatusCode::PRECONDITION_FAILED,
            body: json!({
                "error": "the rules changed since you loaded them (another browser or a hand edit); reload and try again",
                "version": current,
            }),
            etag: Some(current),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if let Some(v) = self.etag {
            set_etag(&mut response, &v);
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"forwarder\""),
            );
        }
        response
    }
}

fn set_etag(response: &mut Response, version: &str) {
    if let Ok(v) = HeaderValue::from_str(&format!("\"{version}\"")) {
        response.headers_mut().insert(header::ETAG, v);
    }
}

/// The rules file as the API returns it.
#[derive(Debug, Serialize)]
pub struct RulesDoc {
    pub file: String,
    /// Also sent as the ETag; send it back as If-Match when changing the rules.
    pub version: String,
    /// The file's text as it is on disk now.
    pub text: String,
    /// The file is valid and its rules are the ones the workers run.
    pub in_force: bool,
    /// Why the file's rules could not be applied, when the last reload was refused.
    pub apply_error: Option<String>,
    pub entries: Vec<RowDoc>,
    /// What is wrong with the file (the rules in force stay the previous ones meanwhile).
    pub errors: Vec<FieldError>,
    /// The rule just added or edited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Why changes made here cannot be saved (the forwarder's user cannot write the file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_problem: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct RowDoc {
    pub id: String,
    pub line: usize,
    pub name: String,
    pub listen_port: String,
    pub dest_ip: String,
    pub dest_port: String,
    /// The fifth column: space-separated `key=value` items, empty when none.
    pub options: String,
    /// The address it listens on, as the figures name it (absent when the port is invalid).
    pub listen: Option<String>,
}

fn rules_doc(sup: &Supervisor, file: &Snapshot, id: Option<String>) -> RulesDoc {
    let running = sup.rules_in_force();
    let ids = entries::assign_ids(file.rows.iter().map(|r| &r.entry));
    let file_errors: Vec<RuleError> = match &file.rules {
        Ok(_) => Vec::new(),
        Err(e) => e.0.clone(),
    };
    let in_force = file_errors.is_empty() && running.entries() == file.entries();
    let errors = file_errors
        .into_iter()
        .map(|e| FieldError {
            id: file
                .rows
                .iter()
                .position(|r| r.line == e.line)
                .map(|i| ids[i].clone()),
            line: e.line,
            field: e.field,
            message: e.message,
        })
        .collect();
    RulesDoc {
        entries: file
            .rows
            .iter()
            .zip(ids)
            .map(|(r, id)| RowDoc {
                id,
                line: r.line,
                name: r.entry.name.clone(),
                listen_port: r.entry.listen_port.clone(),
                dest_ip: r.entry.dest_ip.clone(),
                dest_port: r.entry.dest_port.clone(),
                options: r.entry.options.clone(),
                listen: rules::parse_listen(&r.entry.listen_port)
                    .ok()
                    .map(|a| a.to_string()),
            })
            .collect(),
        file: sup.rules_file().label().to_string(),
        version: file.version.clone(),
        text: file.text.clone(),
        apply_error: if in_force { None } else { sup.reload_error() },
        in_force,
        errors,
        id,
        write_problem: sup.rules_write_problem(),
    }
}

fn read_doc(sup: &Supervisor) -> Result<RulesDoc, ApiError> {
    Ok(rules_doc(sup, &sup.rules_file().current(), None))
}

/// True when an If-Match / If-None-Match header names `version` (or is `*`).
fn etag_matches(header: &str, version: &str) -> bool {
    header.split(',').any(|t| {
        let t = t.trim();
        let t = t.strip_prefix("W/").unwrap_or(t).trim_matches('"');
        t == "*" || t == version
    })
}

fn header_string(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn with_etag(status: StatusCode, doc: RulesDoc) -> Response {
    let version = doc.version.clone();
    let mut response = (status, Json(doc)).into_response();
    set_etag(&mut response, &version);
    response
}

pub async fn get_rules(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let sup = state.sup.clone();
    let doc = call(move || read_doc(&sup)).await??;
    if let Some(inm) = header_string(&headers, header::IF_NONE_MATCH) {
        if etag_matches(&inm, &doc.version) {
            let mut response = StatusCode::NOT_MODIFIED.into_response();
            set_etag(&mut response, &doc.version);
            return Ok(response);
        }
    }
    Ok(with_etag(StatusCode::OK, doc))
}

pub async fn get_rule(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let sup = state.sup.clone();
    let doc = call(move || read_doc(&sup)).await??;
    let version = doc.version.clone();
    let row = doc
        .entries
        .into_iter()
        .find(|r| r.id == id)
        .ok_or_else(|| ApiError::not_found(format!("no rule with id \"{id}\"")))?;
    let mut response = Json(row).into_response();
    set_etag(&mut response, &version);
    Ok(response)
}

pub async fn add_rule(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let entry = parse_entry(&headers, &body)?;
    let doc = change(&state, &headers, Change::Add(entry)).await?;
    Ok(with_etag(StatusCode::CREATED, doc))
}

pub async fn edit_rule(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let entry = parse_entry(&headers, &body)?;
    let doc = change(&state, &headers, Change::Edit(id, entry)).await?;
    Ok(with_etag(StatusCode::OK, doc))
}

/// `PUT /api/rules/ID/state` with `{"state": "drain"|"disabled"|"active"}`: takes a backend out
/// of service or back, by rewriting its `drain`/`disabled` option in the rules file (so it
/// survives a restart); open connections are never cut.
pub async fn set_admin(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let wanted = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("state").and_then(Value::as_str).map(str::to_string));
    let Some(admin) = wanted.as_deref().and_then(Admin::parse) else {
        return Err(ApiError::invalid(
            "send {\"state\": \"drain\"}, {\"state\": \"disabled\"} or {\"state\": \"active\"}",
            Vec::new(),
        ));
    };
    let doc = change(&state, &headers, Change::Admin(id, admin)).await?;
    Ok(with_etag(StatusCode::OK, doc))
}

/// `DELETE /api/rules/ID` or `/api/rules/ID1,ID2,...`: several rows in one write, all or none.
pub async fn delete_rules(
    State(state): State<AppState>,
    Path(ids): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let ids: Vec<String> = ids
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if ids.is_empty() {
        return Err(ApiError::invalid("no rule id given", Vec::new()));
    }
    let doc = change(&state, &headers, Change::Delete(ids)).await?;
    Ok(with_etag(StatusCode::OK, doc))
}

/// Checks If-Match, applies `change` to the rows, and writes and applies the result.
async fn change(
    state: &AppState,
    headers: &HeaderMap,
    change: Change,
) -> Result<RulesDoc, ApiError> {
    let if_match = header_string(headers, header::IF_MATCH);
    let sup = state.sup.clone();
    call(move || write_change(&sup, if_match.as_deref(), &change)).await?
}

/// Tries a change on the rows as they are now. Without If-Match the client asked for no
/// particular version: a write that slipped in between reading and writing is not its
/// conflict, so the change is planned again on the new rows.
fn write_change(
    sup: &Supervisor,
    if_match: Option<&str>,
    change: &Change,
) -> Result<RulesDoc, ApiError> {
    const TRIES: usize = 3;
    for _ in 0..TRIES {
        let file = sup.rules_file().current();
        if let Some(expected) = if_match {
            if !etag_matches(expected, &file.version) {
                return Err(ApiError::stale(file.version.clone()));
            }
        }
        let ids = entries::assign_ids(file.rows.iter().map(|r| &r.entry));
        let plan = entries::plan(&file.rows, &ids, change).map_err(ApiError::not_found)?;
        match sup.write_entries(&plan.numbered(), Some(&file.version)) {
            Ok(written) => {
                let target = plan
                    .target
                    .map(|i| entries::assign_ids(plan.entries.iter())[i].clone());
                return Ok(rules_doc(sup, &written, target));
            }
            Err(WriteError::Stale { current }) if if_match.is_some() => {
                return Err(ApiError::stale(current))
            }
            Err(WriteError::Stale { .. }) => continue,
            Err(WriteError::Invalid(e)) => return Err(refuse(&plan, e.0)),
            Err(e @ WriteError::Io { .. }) => return Err(ApiError::internal(e.to_string())),
        }
    }
    Err(ApiError::unavailable(
        "the rules file kept changing while this change was written; try again",
    ))
}

/// A refused change: every error next to the row it names (the changed row itself has no id
/// yet, or a new one), citing the lines the page shows.
fn refuse(plan: &entries::Plan, errors: Vec<RuleError>) -> ApiError {
    let ids = entries::assign_ids(plan.entries.iter());
    let message = errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    let errors = errors
        .into_iter()
        .map(|e| FieldError {
            id: plan
                .index_of_line(e.line)
                .filter(|&i| Some(i) != plan.target)
                .map(|i| ids[i].clone()),
            line: e.line,
            field: e.field,
            message: e.message,
        })
        .collect();
    ApiError::invalid(message, errors)
}

/// The four fields of a rule from a JSON object; ports may be numbers. Every problem is
/// reported with its field.
fn parse_entry(headers: &HeaderMap, body: &[u8]) -> Result<Entry, ApiError> {
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.trim_start().starts_with("application/json"));
    if !json_type {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the rule as JSON with Content-Type: application/json",
        ));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the body is not valid JSON: {e}"), Vec::new()))?;
    let Value::Object(map) = value else {
        return Err(ApiError::invalid(
            "send a JSON object {\"name\", \"listen_port\", \"dest_ip\", \"dest_port\"} (and \"options\" if any)",
            Vec::new(),
        ));
    };
    const FIELDS: [&str; 4] = ["name", "listen_port", "dest_ip", "dest_port"];
    /// May be left out: a rule without options.
    const OPTIONAL: [&str; 1] = ["options"];
    let mut errors = Vec::new();
    let problem = |field: &str, message: &str| FieldError {
        line: 0,
        field: field.to_string(),
        message: message.to_string(),
        id: None,
    };
    for key in map
        .keys()
        .filter(|k| !FIELDS.contains(&k.as_str()) && !OPTIONAL.contains(&k.as_str()))
    {
        errors.push(problem(
            key,
            "unknown field (a rule has name, listen_port, dest_ip, dest_port, options)",
        ));
    }
    let mut fields: HashMap<&str, String> = HashMap::new();
    for field in FIELDS.into_iter().chain(OPTIONAL) {
        match map.get(field) {
            None if OPTIONAL.contains(&field) => {}
            None => errors.push(problem(field, "missing")),
            Some(Value::String(s)) => {
                fields.insert(field, s.trim().to_string());
            }
            Some(Value::Number(n)) if n.is_u64() => {
                fields.insert(field, n.to_string());
            }
            Some(_) => errors.push(problem(
                field,
                "must be a string (or a whole number for a port)",
            )),
        }
    }
    if !errors.is_empty() {
        let message = errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect::<Vec<_>>()
            .join("\n");
        return Err(ApiError::invalid(message, errors));
    }
    let mut take = |f: &str| fields.remove(f).unwrap_or_default();
    Ok(Entry {
        name: take("name"),
        listen_port: take("listen_port"),
        dest_ip: take("dest_ip"),
        dest_port: take("dest_port"),
        // Whitespace between items is the separator: keep it single, as a person writes it.
        options: take("options")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
    })
}

/// The figures, with the server's clock so the page can say "down for 12 s".
#[derive(Serialize)]
struct StatsDoc {
    now_ms: u64,
    /// How the page itself is served, for its banner.
    web: WebDoc,
    #[serde(flatten)]
    stats: StatsSnapshot,
}

/// How the page is served: `warning` is set when the token and the rules travel in clear.
#[derive(Serialize)]
struct WebDoc {
    https: bool,
    warning: Option<&'static str>,
}

pub async fn get_stats(State(state): State<AppState>) -> Result<Response, ApiError> {
    let sup = state.sup.clone();
    let stats = call(move || sup.stats()).await?;
    Ok(Json(StatsDoc {
        now_ms: crate::stats::now_ms(),
        web: WebDoc {
            https: state.transport == super::Transport::Https,
            warning: state.transport.warning(),
        },
        stats,
    })
    .into_response())
}

#[derive(serde::Deserialize)]
pub struct HistoryQuery {
    /// Only points newer than this (unix ms).
    since: Option<u64>,
}

pub async fn get_history(State(state): State<AppState>, Query(q): Query<HistoryQuery>) -> Response {
    let view = state
        .history
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .view(q.since.unwrap_or(0));
    Json(view).into_response()
}

/// One connection as the API shows it; the id is a string because it does not fit a
/// JavaScript number.
#[derive(Serialize)]
struct ConnectionDoc {
    id: String,
    worker: usize,
    client: String,
    /// As the figures name the pool: `0.0.0.0:8080`, `0.0.0.0:53/udp`.
    listen: String,
    /// `tcp` or `udp` (a UDP session: state `session`, and the datagram figures below).
    proto: Proto,
    rule: String,
    backend: String,
    state: String,
    bytes_up: u64,
    bytes_down: u64,
    age_ms: u64,
    client_half_closed: bool,
    backend_half_closed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    datagrams_up: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    datagrams_down: Option<u64>,
    /// Milliseconds since the session's last datagram (UDP).
    #[serde(skip_serializing_if = "Option::is_none")]
    idle_ms: Option<u64>,
    /// The TLS server name the client asked for (pools with `sni=` rows only).
    #[serde(skip_serializing_if = "Option::is_none")]
    sni: Option<String>,
}

#[derive(serde::Deserialize)]
pub struct ConnectionsQuery {
    /// At most this many connections (the oldest first); the total is in `X-Total-Count`.
    limit: Option<usize>,
    /// Ask the workers now instead of reusing a list up to a second old: a load client that
    /// matches every one of its connections to a backend must see the ones opened last.
    #[serde(default)]
    fresh: bool,
}

pub async fn get_connections(
    State(state): State<AppState>,
    Query(q): Query<ConnectionsQuery>,
) -> Result<Response, ApiError> {
    if q.fresh {
        state.forget_connections();
    }
    let mut list: Vec<&ConnectionInfo> = Vec::new();
    let all = state.connections().await?;
    list.extend(all.iter());
    let total = list.len();
    list.sort_by(|a, b| b.age_ms.cmp(&a.age_ms).then(a.id.cmp(&b.id)));
    if let Some(limit) = q.limit {
        list.truncate(limit);
    }
    let docs: Vec<ConnectionDoc> = list
        .into_iter()
        .map(|c| ConnectionDoc {
            id: c.id.to_string(),
            worker: c.worker,
            client: c.client.to_string(),
            listen: rules::Listen {
                addr: c.listen,
                ports: rules::PortRange::single(c.listen.port()),
                proto: c.proto,
            }
            .to_string(),
            proto: c.proto,
            rule: c.rule.clone(),
            backend: c.backend.to_string(),
            state: c.state.clone(),
            bytes_up: c.bytes_up,
            bytes_down: c.bytes_down,
            age_ms: c.age_ms,
            client_half_closed: c.client_half_closed,
            backend_half_closed: c.backend_half_closed,
            datagrams_up: c.udp.as_ref().map(|u| u.datagrams_up),
            datagrams_down: c.udp.as_ref().map(|u| u.datagrams_down),
            idle_ms: c.udp.as_ref().map(|u| u.idle_ms),
            sni: c.sni.clone(),
        })
        .collect();
    let mut response = Json(docs).into_response();
    response
        .headers_mut()
        .insert("x-total-count", HeaderValue::from(total));
    Ok(response)
}

pub async fn close_connection(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let number: u64 = id.parse().map_err(|_| {
        ApiError::invalid(
            format!("connection id \"{id}\" is not a number"),
            Vec::new(),
        )
    })?;
    let sup = state.sup.clone();
    let closed = call(move || sup.close_connection(number)).await?;
    state.forget_connections();
    if closed {
        Ok(Json(json!({ "closed": id })).into_response())
    } else {
        Err(ApiError::not_found(format!(
            "no connection {id} (it may have closed already)"
        )))
    }
}

pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(format!("nothing at {}", uri.path()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h
    }

    #[test]
    fn etags_match_quoted_weak_lists_and_star() {
        assert!(etag_matches("\"abc\"", "abc"));
        assert!(etag_matches("W/\"abc\"", "abc"));
        assert!(etag_matches("\"x\", \"abc\"", "abc"));
        assert!(etag_matches("*", "abc"));
        assert!(!etag_matches("\"abd\"", "abc"));
    }

    #[test]
    fn entry_fields_are_checked_one_by_one() {
        let e = parse_entry(
            &json_headers(),
            br#"{"name":" web ","listen_port":8080,"dest_ip":"127.0.0.1","dest_port":"9001"}"#,
        )
        .unwrap();
        assert_eq!(e.name, "web");
        assert_eq!(e.listen_port, "8080");
        let err = parse_entry(
            &json_headers(),
            br#"{"name":"a","listen_port":-1,"dest_ip":"h","colour":"red"}"#,
        )
        .unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        let fields: Vec<&str> = err.body["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["field"].as_str().unwrap())
            .collect();
        assert_eq!(fields, vec!["colour", "listen_port", "dest_port"]);
        let err = parse_entry(&HeaderMap::new(), b"{}").unwrap_err();
        assert_eq!(err.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }

    proptest::proptest! {
        /// Any body, JSON or not, is answered with an entry or a 4xx naming what is wrong.
        #[test]
        fn any_body_gets_an_entry_or_a_client_error(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            fields in proptest::collection::vec(
                ("(name|listen_port|dest_ip|dest_port|options|[a-z]{1,6})", "[ -~]{0,12}"),
                0..7,
            ),
        ) {
            let object: serde_json::Map<String, Value> =
                fields.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
            let json = serde_json::to_vec(&Value::Object(object)).unwrap();
            for candidate in [body, json] {
                match parse_entry(&json_headers(), &candidate) {
                    Ok(entry) => proptest::prop_assert!(!entry.options.contains("  ")),
                    Err(e) => {
                        proptest::prop_assert!(e.status.is_client_error());
                        let message = e.body["error"].as_str().unwrap_or_default();
                        proptest::prop_assert!(!message.is_empty());
                    }
                }
            }
        }
    }
}
