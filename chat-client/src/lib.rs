//! chat-client: a desktop client for chat-server. `net` talks to the server on background threads,
//! `state` turns what arrives into the chat's state, `settings` remembers the dialog's values,
//! `app` holds the actions, `view` draws with egui, `theme` is the look. Everything but `main.rs`
//! runs without a window, so tests drive it with egui_kittest.

pub mod app;
pub mod net;
pub mod settings;
pub mod state;
pub mod theme;
pub mod view;
