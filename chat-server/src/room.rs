//! The chat room: who is connected under which nickname, the recent history, and what each line a
//! client sends means. It knows nothing about sockets: it answers every event with [`Effect`]s
//! (lines to one client or to everyone, connections to close), which the server carries out. That
//! keeps the rules testable without a network.

use std::collections::{HashMap, VecDeque};

use chrono::{DateTime, Utc};

use crate::framing::Frame;
use crate::protocol::{ClientLine, ErrorCode, LeaveReason, Nickname, ServerLine, NICK_RULES};

/// The server's handle for one connection.
pub type ClientId = usize;

/// Something the server must do after the room handled an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Queue a line for one client.
    To(ClientId, String),
    /// Queue a line for every client that has a nickname.
    All(String),
    /// Close this connection once its queued lines were handed to the kernel; the room already
    /// forgot it.
    Close(ClientId),
}

#[derive(Debug)]
enum Member {
    /// Connected, no nickname yet: receives only replies to its own lines.
    Naming,
    Named(Nickname),
}

#[derive(Debug, Clone)]
struct Said {
    at: DateTime<Utc>,
    nick: String,
    text: String,
}

/// Counters for the operator's summary.
#[derive(Debug, Default, Clone, Copy)]
pub struct RoomStats {
    pub joined: u64,
    pub messages: u64,
    pub refused_lines: u64,
}

/// See the module comment.
#[derive(Debug)]
pub struct Room {
    members: HashMap<ClientId, Member>,
    /// Nickname key (lower case) -> holder, for uniqueness.
    holders: HashMap<String, ClientId>,
    history: VecDeque<Said>,
    history_len: usize,
    pub stats: RoomStats,
}

const HELP: &[&str] = &[
    "Type a line and press Enter to say it to everyone.",
    "/who          list who is online",
    "/nick NAME    change your nickname",
    "/quit         leave the chat",
    "/help         this text",
    "//text        say a line that starts with '/'",
];

impl Room {
    /// A room that replays the last `history_len` messages to each newcomer.
    pub fn new(history_len: usize) -> Room {
        Room {
            members: HashMap::new(),
            holders: HashMap::new(),
            history: VecDeque::with_capacity(history_len.min(1024)),
            history_len,
            stats: RoomStats::default(),
        }
    }

    /// Connections known to the room (named or not).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Clients that receive broadcasts (those with a nickname).
    pub fn named(&self) -> impl Iterator<Item = ClientId> + '_ {
        self.members
            .iter()
            .filter(|(_, m)| matches!(m, Member::Named(_)))
            .map(|(&id, _)| id)
    }

    /// The nickname of `id`, if it has one.
    pub fn nick_of(&self, id: ClientId) -> Option<&str> {
        match self.members.get(&id) {
            Some(Member::Named(n)) => Some(n.as_str()),
            _ => None,
        }
    }

    /// A new connection: greet it and wait for its nickname.
    pub fn connect(&mut self, id: ClientId, out: &mut Vec<Effect>) {
        self.members.insert(id, Member::Naming);
        let text = format!("chat-server: send your nickname ({NICK_RULES})");
        out.push(Effect::To(id, ServerLine::Hello { text }.to_string()));
    }

    /// One framed line (or refusal) from `id`.
    pub fn frame(&mut self, id: ClientId, frame: Frame, now: DateTime<Utc>, out: &mut Vec<Effect>) {
        let refusal = match frame {
            Frame::Line(line) => return self.line(id, &line, now, out),
            Frame::TooLong => (ErrorCode::LineTooLong, "line is too long; it was not sent"),
            Frame::BadUtf8 => (
                ErrorCode::BadUtf8,
                "line is not valid UTF-8; it was not sent",
            ),
        };
        self.refuse(id, refusal.0, refusal.1.to_string(), out);
    }

    fn refuse(&mut self, id: ClientId, code: ErrorCode, text: String, out: &mut Vec<Effect>) {
        self.stats.refused_lines += 1;
        out.push(Effect::To(id, ServerLine::Err { code, text }.to_string()));
    }

    fn line(&mut self, id: ClientId, line: &str, now: DateTime<Utc>, out: &mut Vec<Effect>) {
        // Control characters (escape sequences, NUL, ...) would garble other people's terminals.
        if line.chars().any(|c| c.is_control() && c != '\t') {
            let text = "line contains control characters; it was not sent".to_string();
            return self.refuse(id, ErrorCode::ControlChars, text, out);
        }
        match self.members.get(&id) {
            None => {}
            Some(Member::Naming) => self.choose_nick(id, line.trim(), now, out),
            Some(Member::Named(_)) => match ClientLine::parse(line) {
                ClientLine::Blank => {}
                ClientLine::Message(text) => self.say(id, text, now, out),
                ClientLine::Who => out.push(Effect::To(id, self.users_line())),
                ClientLine::Nick(new) => self.rename(id, new, now, out),
                ClientLine::Quit => {
                    self.leave(id, LeaveReason::Quit, now, out);
                    out.push(Effect::To(
                        id,
                        ServerLine::Bye {
                            text: "goodbye".into(),
                        }
                        .to_string(),
                    ));
                    out.push(Effect::Close(id));
                }
                ClientLine::Help => {
                    for text in HELP {
                        let line = ServerLine::Info {
                            text: text.to_string(),
                        };
                        out.push(Effect::To(id, line.to_string()));
                    }
                }
                ClientLine::Unknown(word) => {
                    let text = format!("unknown command \"/{word}\"; /help lists the commands");
                    self.refuse(id, ErrorCode::UnknownCommand, text, out);
                }
            },
        }
    }

    /// Checks a nickname: valid and not held by anyone else. Refusals leave the client where it
    /// was, so it can simply send another one.
    fn check_nick(&mut self, id: ClientId, text: &str, out: &mut Vec<Effect>) -> Option<Nickname> {
        let nick = match Nickname::parse(text) {
            Ok(n) => n,
            Err(e) => {
                let hint = if self.nick_of(id).is_none() {
                    "; send another one"
                } else {
                    ""
                };
                self.refuse(id, ErrorCode::NickInvalid, format!("{e}{hint}"), out);
                return None;
            }
        };
        match self.holders.get(&nick.key()) {
            Some(&holder) if holder != id => {
                let hint = if self.nick_of(id).is_none() {
                    "; send another one"
                } else {
                    ""
                };
                let text = format!("nickname \"{nick}\" is taken{hint}");
                self.refuse(id, ErrorCode::NickTaken, text, out);
                None
            }
            _ => Some(nick),
        }
    }

    fn choose_nick(&mut self, id: ClientId, text: &str, now: DateTime<Utc>, out: &mut Vec<Effect>) {
        let Some(nick) = self.check_nick(id, text, out) else {
            return;
        };
        self.holders.insert(nick.key(), id);
        self.members.insert(id, Member::Named(nick.clone()));
        self.stats.joined += 1;
        let online = self.holders.len();
        let earlier = match self.history.len() {
            1 => "1 earlier message follows".to_string(),
            n => format!("{n} earlier messages follow"),
        };
        let text = format!("welcome, {nick}: {online} online, {earlier}; /help lists the commands");
        out.push(Effect::To(
            id,
            ServerLine::Ok {
                nick: nick.to_string(),
                text,
            }
            .to_string(),
        ));
        for said in &self.history {
            let line = ServerLine::Hist {
                at: said.at,
                nick: said.nick.clone(),
                text: said.text.clone(),
            };
            out.push(Effect::To(id, line.to_string()));
        }
        out.push(Effect::To(id, self.users_line()));
        let join = ServerLine::Join {
            at: now,
            nick: nick.to_string(),
        };
        out.push(Effect::All(join.to_string()));
    }

    fn say(&mut self, id: ClientId, text: &str, now: DateTime<Utc>, out: &mut Vec<Effect>) {
        let Some(nick) = self.nick_of(id).map(str::to_string) else {
            return;
        };
        self.stats.messages += 1;
        let line = ServerLine::Msg {
            at: now,
            nick: nick.clone(),
            text: text.to_string(),
        };
        out.push(Effect::All(line.to_string()));
        if self.history_len > 0 {
            if self.history.len() == self.history_len {
                self.history.pop_front();
            }
            self.history.push_back(Said {
                at: now,
                nick,
                text: text.to_string(),
            });
        }
    }

    fn rename(&mut self, id: ClientId, text: &str, now: DateTime<Utc>, out: &mut Vec<Effect>) {
        let Some(old) = self.nick_of(id).map(str::to_string) else {
            return;
        };
        if text == old {
            let line = ServerLine::Info {
                text: format!("you are already {old}"),
            };
            return out.push(Effect::To(id, line.to_string()));
        }
        let Some(new) = self.check_nick(id, text, out) else {
            return;
        };
        self.holders.remove(&old.to_ascii_lowercase());
        self.holders.insert(new.key(), id);
        self.members.insert(id, Member::Named(new.clone()));
        let line = ServerLine::Nick {
            at: now,
            old,
            new: new.to_string(),
        };
        out.push(Effect::All(line.to_string()));
    }

    /// `id` is gone (or about to be): forget it and tell the others if it had joined. Calling it
    /// again for the same id does nothing.
    pub fn leave(
        &mut self,
        id: ClientId,
        reason: LeaveReason,
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        if let Some(Member::Named(nick)) = self.members.remove(&id) {
            self.holders.remove(&nick.key());
            let line = ServerLine::Leave {
                at: now,
                nick: nick.to_string(),
                reason,
            };
            out.push(Effect::All(line.to_string()));
        }
    }

    fn users_line(&self) -> String {
        let mut nicks: Vec<String> = self
            .members
            .values()
            .filter_map(|m| match m {
                Member::Named(n) => Some(n.to_string()),
                Member::Naming => None,
            })
            .collect();
        nicks.sort_by_key(|n| n.to_ascii_lowercase());
        ServerLine::Users { nicks }.to_string()
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

    fn send(room: &mut Room, id: ClientId, line: &str) -> Vec<Effect> {
        let mut out = Vec::new();
        room.frame(id, Frame::Line(line.into()), t(), &mut out);
        out
    }

    fn to(id: ClientId, s: &str) -> Effect {
        Effect::To(id, s.to_string())
    }

    fn all(s: &str) -> Effect {
        Effect::All(s.to_string())
    }

    fn joined(room: &mut Room, id: ClientId, nick: &str) {
        let mut out = Vec::new();
        room.connect(id, &mut out);
        send(room, id, nick);
    }

    #[test]
    fn join_sequence() {
        let mut room = Room::new(10);
        let mut out = Vec::new();
        room.connect(1, &mut out);
        assert_eq!(out, vec![to(1, "HELLO chat-server: send your nickname (1-24 characters: letters a-z A-Z, digits, '-', '_' or '.', starting with a letter or digit)")]);
        assert_eq!(
            send(&mut room, 1, " alice "),
            vec![
                to(1, "OK alice welcome, alice: 1 online, 0 earlier messages follow; /help lists the commands"),
                to(1, "USERS 1 alice"),
                all("JOIN 2026-11-25T06:40:01.123Z alice"),
            ]
        );
    }

    #[test]
    fn taken_nick_gets_second_chance() {
        let mut room = Room::new(10);
        joined(&mut room, 1, "alice");
        let mut out = Vec::new();
        room.connect(2, &mut out);
        assert_eq!(
            send(&mut room, 2, "ALICE"),
            vec![to(
                2,
                "ERR nick-taken nickname \"ALICE\" is taken; send another one"
            )]
        );
        assert_eq!(
            send(&mut room, 2, "a b"),
            vec![to(2, "ERR nick-invalid nickname may not contain ' '; 1-24 characters: letters a-z A-Z, digits, '-', '_' or '.', starting with a letter or digit; send another one")]
        );
        let out = send(&mut room, 2, "bob");
        assert_eq!(out[1], to(2, "USERS 2 alice bob"));
        assert_eq!(room.named().count(), 2);
    }

    #[test]
    fn messages_broadcast_and_history_is_bounded() {
        let mut room = Room::new(2);
        joined(&mut room, 1, "alice");
        for text in ["one", "two", "three"] {
            assert_eq!(
                send(&mut room, 1, text),
                vec![all(&format!("MSG 2026-11-25T06:40:01.123Z alice {text}"))]
            );
        }
        let mut out = Vec::new();
        room.connect(2, &mut out);
        let out = send(&mut room, 2, "bob");
        assert_eq!(out[1], to(2, "HIST 2026-11-25T06:40:01.123Z alice two"));
        assert_eq!(out[2], to(2, "HIST 2026-11-25T06:40:01.123Z alice three"));
        assert_eq!(out.len(), 5);
    }

    #[test]
    fn commands() {
        let mut room = Room::new(0);
        joined(&mut room, 1, "alice");
        joined(&mut room, 2, "Bob");
        assert_eq!(send(&mut room, 1, "/who"), vec![to(1, "USERS 2 alice Bob")]);
        assert_eq!(
            send(&mut room, 1, "/nick bob"),
            vec![to(1, "ERR nick-taken nickname \"bob\" is taken")]
        );
        assert_eq!(
            send(&mut room, 2, "/nick bob"),
            vec![all("NICK 2026-11-25T06:40:01.123Z Bob bob")]
        );
        assert_eq!(
            send(&mut room, 2, "/nick bob"),
            vec![to(2, "INFO you are already bob")]
        );
        assert_eq!(
            send(&mut room, 1, "/nick carol"),
            vec![all("NICK 2026-11-25T06:40:01.123Z alice carol")]
        );
        assert_eq!(
            send(&mut room, 1, "/dance"),
            vec![to(
                1,
                "ERR unknown-command unknown command \"/dance\"; /help lists the commands"
            )]
        );
        assert_eq!(send(&mut room, 1, ""), vec![]);
        assert_eq!(
            send(&mut room, 1, "/quit"),
            vec![
                all("LEAVE 2026-11-25T06:40:01.123Z carol quit"),
                to(1, "BYE goodbye"),
                Effect::Close(1)
            ]
        );
        // The name is free again.
        joined(&mut room, 3, "alice");
        assert_eq!(room.nick_of(3), Some("alice"));
        assert_eq!(send(&mut room, 3, "/help").len(), HELP.len());
    }

    #[test]
    fn bad_input_is_refused() {
        let mut room = Room::new(5);
        joined(&mut room, 1, "alice");
        let mut out = Vec::new();
        room.frame(1, Frame::TooLong, t(), &mut out);
        room.frame(1, Frame::BadUtf8, t(), &mut out);
        assert_eq!(
            out,
            vec![
                to(1, "ERR line-too-long line is too long; it was not sent"),
                to(1, "ERR bad-utf8 line is not valid UTF-8; it was not sent"),
            ]
        );
        assert_eq!(
            send(&mut room, 1, "red \u{1b}[31m"),
            vec![to(
                1,
                "ERR control-chars line contains control characters; it was not sent"
            )]
        );
        assert_eq!(room.stats.refused_lines, 3);
    }

    #[test]
    fn leave_only_announces_named_clients_once() {
        let mut room = Room::new(5);
        joined(&mut room, 1, "alice");
        let mut out = Vec::new();
        room.connect(2, &mut out);
        out.clear();
        room.leave(2, LeaveReason::Closed, t(), &mut out);
        assert!(out.is_empty());
        room.leave(1, LeaveReason::Dropped, t(), &mut out);
        room.leave(1, LeaveReason::Dropped, t(), &mut out);
        assert_eq!(
            out,
            vec![all("LEAVE 2026-11-25T06:40:01.123Z alice dropped")]
        );
        assert!(room.is_empty());
    }
}
