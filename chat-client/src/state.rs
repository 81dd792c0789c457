//! What the client knows about the chat: the connection's phase, the message list, who is online,
//! and the last error. It changes only through [`ChatState::apply`] with events from the network,
//! so it is tested without a window or a socket.

use std::collections::VecDeque;

use chat_server::protocol::{ErrorCode, LeaveReason, ServerLine};
use chrono::{DateTime, Utc};

use crate::net::NetEvent;

/// The most entries kept; older ones scroll away for good.
pub const MAX_ENTRIES: usize = 10_000;

/// Where the connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Nothing tried yet.
    Idle,
    /// Resolving and connecting.
    Connecting,
    /// Connected, nickname sent or refused.
    Naming,
    /// In the room.
    Chatting,
    /// The connection failed or ended; `error` says why.
    Disconnected,
}

/// One row of the message list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub at: DateTime<Utc>,
    pub kind: EntryKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A chat message; `earlier` for history replayed on joining.
    Message {
        nick: String,
        text: String,
        earlier: bool,
    },
    Joined {
        nick: String,
    },
    Left {
        nick: String,
        reason: LeaveReason,
    },
    Renamed {
        old: String,
        new: String,
    },
    /// Text from the server for people (welcome, help, /who replies).
    Info(String),
    /// Something went wrong but the connection lives (a refused line, a garbled line).
    Problem(String),
}

/// See the module comment.
#[derive(Debug, Clone)]
pub struct ChatState {
    pub phase: Phase,
    /// `host:port` of the current or last connection.
    pub target: String,
    /// The nickname asked for, then the one the server accepted (and later renames).
    pub nick: String,
    pub entries: VecDeque<Entry>,
    /// Who is online, sorted without regard to case.
    pub users: Vec<String>,
    /// Why the connection failed, or why the nickname was refused.
    pub error: Option<String>,
    /// The nickname was refused while joining: the dialog should ask for another.
    pub nick_refused: bool,
    /// Set once the room was joined on this connection or an earlier one.
    pub ever_joined: bool,
    bye: Option<String>,
    /// Joined, and the USERS line of the join sequence has not come yet.
    awaiting_users: bool,
}

impl Default for ChatState {
    fn default() -> Self {
        ChatState::new()
    }
}

impl ChatState {
    pub fn new() -> ChatState {
        ChatState {
            phase: Phase::Idle,
            target: String::new(),
            nick: String::new(),
            entries: VecDeque::new(),
            users: Vec::new(),
            error: None,
            nick_refused: false,
            ever_joined: false,
            bye: None,
            awaiting_users: false,
        }
    }

    /// A new connection attempt to `target` as `nick` has started.
    pub fn connecting(&mut self, target: &str, nick: &str) {
        self.phase = Phase::Connecting;
        self.target = target.to_string();
        self.nick = nick.to_string();
        self.error = None;
        self.nick_refused = false;
        self.users.clear();
        self.bye = None;
    }

    /// Another nickname is being tried on the open connection.
    pub fn renaming(&mut self, nick: &str) {
        self.nick = nick.to_string();
        self.error = None;
        self.nick_refused = false;
    }

    /// Applies one network event; returns lines to send back (the nickname once connected).
    pub fn apply(&mut self, event: NetEvent, now: DateTime<Utc>) -> Vec<String> {
        match event {
            NetEvent::Connected { .. } => {
                self.phase = Phase::Naming;
                return vec![self.nick.clone()];
            }
            NetEvent::Line(line) => self.apply_line(line, now),
            NetEvent::Garbled(why) => self.push(now, EntryKind::Problem(why)),
            NetEvent::Closed { error } => {
                self.phase = Phase::Disconnected;
                self.users.clear();
                self.error = Some(match self.bye.take() {
                    Some(bye) => format!("{error} ({bye})"),
                    None => error,
                });
            }
        }
        Vec::new()
    }

    fn apply_line(&mut self, line: ServerLine, now: DateTime<Utc>) {
        match line {
            ServerLine::Hello { .. } => {}
            ServerLine::Ok { nick, .. } => {
                self.phase = Phase::Chatting;
                self.nick = nick;
                self.error = None;
                self.nick_refused = false;
                self.ever_joined = true;
                self.awaiting_users = true;
                let text = format!(
                    "You joined {} as {}. Type /help for commands.",
                    self.target, self.nick
                );
                self.push(now, EntryKind::Info(text));
            }
            ServerLine::Err { code, text } => {
                let naming = self.phase == Phase::Naming;
                if naming && matches!(code, ErrorCode::NickTaken | ErrorCode::NickInvalid) {
                    self.nick_refused = true;
                    self.error = Some(capitalise(&text));
                } else {
                    self.push(now, EntryKind::Problem(capitalise(&text)));
                }
            }
            ServerLine::Hist { at, nick, text } => self.push(
                at,
                EntryKind::Message {
                    nick,
                    text,
                    earlier: true,
                },
            ),
            ServerLine::Msg { at, nick, text } => self.push(
                at,
                EntryKind::Message {
                    nick,
                    text,
                    earlier: false,
                },
            ),
            ServerLine::Join { at, nick } => {
                if !self.users.contains(&nick) {
                    self.users.push(nick.clone());
                    sort_users(&mut self.users);
                }
                self.push(at, EntryKind::Joined { nick });
            }
            ServerLine::Leave { at, nick, reason } => {
                self.users.retain(|u| *u != nick);
                self.push(at, EntryKind::Left { nick, reason });
            }
            ServerLine::Nick { at, old, new } => {
                for u in self.users.iter_mut().filter(|u| **u == old) {
                    *u = new.clone();
                }
                sort_users(&mut self.users);
                if self.nick == old {
                    self.nick = new.clone();
                }
                self.push(at, EntryKind::Renamed { old, new });
            }
            ServerLine::Users { nicks } => {
                self.users = nicks;
                sort_users(&mut self.users);
                // The list that ends the join sequence only fills the side panel; a later one
                // answers /who, so it is shown.
                if !std::mem::take(&mut self.awaiting_users) {
                    let text = format!("Online ({}): {}", self.users.len(), self.users.join(", "));
                    self.push(now, EntryKind::Info(text));
                }
            }
            ServerLine::Info { text } => self.push(now, EntryKind::Info(text)),
            ServerLine::Bye { text } => self.bye = Some(text),
        }
    }

    fn push(&mut self, at: DateTime<Utc>, kind: EntryKind) {
        if self.entries.len() == MAX_ENTRIES {
            self.entries.pop_front();
        }
        self.entries.push_back(Entry { at, kind });
    }
}

fn sort_users(users: &mut [String]) {
    users.sort_by_key(|u| u.to_ascii_lowercase());
}

fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-25T06:40:01.123Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn line(state: &mut ChatState, text: &str) -> Vec<String> {
        state.apply(NetEvent::Line(ServerLine::parse(text).unwrap()), t())
    }

    fn joined(nick: &str) -> ChatState {
        let mut s = ChatState::new();
        s.connecting("127.0.0.1:7000", nick);
        assert_eq!(
            s.apply(
                NetEvent::Connected {
                    peer: "127.0.0.1:7000".into()
                },
                t()
            ),
            vec![nick.to_string()]
        );
        assert_eq!(s.phase, Phase::Naming);
        line(&mut s, "HELLO chat-server: send your nickname");
        line(&mut s, &format!("OK {nick} welcome"));
        s
    }

    #[test]
    fn join_sequence_fills_the_user_list_and_history() {
        let mut s = joined("alice");
        assert_eq!(s.phase, Phase::Chatting);
        line(&mut s, "HIST 2026-11-25T06:30:00.000Z bob earlier words");
        line(&mut s, "USERS 2 bob alice");
        line(&mut s, "JOIN 2026-11-25T06:40:01.123Z alice");
        assert_eq!(s.users, vec!["alice", "bob"]);
        assert_eq!(
            s.entries[1].kind,
            EntryKind::Message {
                nick: "bob".into(),
                text: "earlier words".into(),
                earlier: true
            }
        );
        assert_eq!(s.entries[1].at.to_rfc3339(), "2026-11-25T06:30:00+00:00");
        assert_eq!(s.entries.len(), 3);
    }

    #[test]
    fn joins_leaves_renames_and_messages() {
        let mut s = joined("alice");
        line(&mut s, "USERS 1 alice");
        line(&mut s, "JOIN 2026-11-25T06:40:01.123Z Zed");
        line(&mut s, "JOIN 2026-11-25T06:40:01.123Z bob");
        assert_eq!(s.users, vec!["alice", "bob", "Zed"]);
        line(&mut s, "NICK 2026-11-25T06:40:01.123Z alice ally");
        assert_eq!(s.nick, "ally");
        assert_eq!(s.users, vec!["ally", "bob", "Zed"]);
        line(&mut s, "MSG 2026-11-25T06:40:01.123Z bob hi  there");
        line(&mut s, "LEAVE 2026-11-25T06:40:01.123Z bob dropped");
        assert_eq!(s.users, vec!["ally", "Zed"]);
        let last: Vec<_> = s
            .entries
            .iter()
            .rev()
            .take(2)
            .map(|e| e.kind.clone())
            .collect();
        assert_eq!(
            last,
            vec![
                EntryKind::Left {
                    nick: "bob".into(),
                    reason: LeaveReason::Dropped
                },
                EntryKind::Message {
                    nick: "bob".into(),
                    text: "hi  there".into(),
                    earlier: false
                },
            ]
        );
        // A /who reply after joining is shown in the list too.
        line(&mut s, "USERS 2 ally Zed");
        assert_eq!(
            s.entries.back().unwrap().kind,
            EntryKind::Info("Online (2): ally, Zed".into())
        );
    }

    #[test]
    fn refused_nickname_asks_again() {
        let mut s = ChatState::new();
        s.connecting("h:1", "alice");
        s.apply(NetEvent::Connected { peer: "h:1".into() }, t());
        line(
            &mut s,
            "ERR nick-taken nickname \"alice\" is taken; send another one",
        );
        assert!(s.nick_refused);
        assert_eq!(
            s.error.as_deref(),
            Some("Nickname \"alice\" is taken; send another one")
        );
        assert_eq!(s.phase, Phase::Naming);
        s.renaming("alice2");
        line(&mut s, "OK alice2 welcome");
        assert!(!s.nick_refused && s.error.is_none());
        assert_eq!((s.phase, s.nick.as_str()), (Phase::Chatting, "alice2"));
    }

    #[test]
    fn errors_while_chatting_go_in_the_list() {
        let mut s = joined("alice");
        line(
            &mut s,
            "ERR line-too-long line is too long; it was not sent",
        );
        assert_eq!(
            s.entries.back().unwrap().kind,
            EntryKind::Problem("Line is too long; it was not sent".into())
        );
        assert!(!s.nick_refused);
    }

    #[test]
    fn closing_keeps_the_reason_and_the_goodbye() {
        let mut s = joined("alice");
        line(&mut s, "USERS 1 alice");
        line(&mut s, "BYE server shutting down");
        s.apply(
            NetEvent::Closed {
                error: "the server closed the connection".into(),
            },
            t(),
        );
        assert_eq!(s.phase, Phase::Disconnected);
        assert_eq!(
            s.error.as_deref(),
            Some("the server closed the connection (server shutting down)")
        );
        assert!(s.users.is_empty());
        // Reconnecting clears the error.
        s.connecting("127.0.0.1:7000", "alice");
        assert_eq!((s.phase, s.error.as_ref()), (Phase::Connecting, None));
    }

    #[test]
    fn garbled_lines_are_shown_not_fatal() {
        let mut s = joined("alice");
        s.apply(
            NetEvent::Garbled("not a chat-server line (unknown line kind): \"PING\"".into()),
            t(),
        );
        assert_eq!(s.phase, Phase::Chatting);
        assert!(matches!(
            s.entries.back().unwrap().kind,
            EntryKind::Problem(_)
        ));
    }

    #[test]
    fn the_list_is_bounded() {
        let mut s = joined("alice");
        for i in 0..MAX_ENTRIES + 5 {
            line(&mut s, &format!("MSG 2026-11-25T06:40:01.123Z bob {i}"));
        }
        assert_eq!(s.entries.len(), MAX_ENTRIES);
        assert_eq!(
            s.entries.back().unwrap().kind,
            EntryKind::Message {
                nick: "bob".into(),
                text: format!("{}", MAX_ENTRIES + 4),
                earlier: false
            }
        );
    }
}
