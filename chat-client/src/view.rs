//! Drawing: the connect dialog, and the chat screen (header, user list, message list, input line,
//! status bar). Pure egui on a `Ui`, so egui_kittest can drive it without a window.

use chrono::Local;
use egui::text::LayoutJob;
use egui::{
    Align, Button, CornerRadius, FontId, Frame, Key, Label, Layout, Margin, RichText, ScrollArea,
    Stroke, TextEdit, TextFormat, Ui,
};

use chat_server::protocol::LeaveReason;

use crate::app::{ChatApp, Screen};
use crate::state::{Entry, EntryKind, Phase};
use crate::theme::{self, nick_colour};

/// Shows the screen the app is on.
pub fn show(app: &mut ChatApp, ui: &mut Ui) {
    match app.screen {
        Screen::Dialog => dialog(app, ui),
        Screen::Chat => chat(app, ui),
    }
}

fn dialog(app: &mut ChatApp, ui: &mut Ui) {
    let busy = matches!(app.state.phase, Phase::Connecting)
        || (app.state.phase == Phase::Naming && !app.state.nick_refused);
    egui::CentralPanel::default()
        .frame(Frame::new().fill(theme::BACKGROUND))
        .show(ui, |ui| {
            let card_height = 330.0;
            ui.add_space(((ui.available_height() - card_height) / 2.0).max(16.0));
            ui.vertical_centered(|ui| {
                Frame::new()
                    .fill(theme::CARD)
                    .stroke(Stroke::new(1.0, theme::BORDER))
                    .corner_radius(CornerRadius::same(10))
                    .inner_margin(Margin::same(24))
                    .show(ui, |ui| {
                        ui.set_width(340.0);
                        ui.with_layout(Layout::top_down(Align::Min), |ui| {
                            dialog_contents(app, ui, busy);
                        });
                    });
            });
        });
}

fn dialog_contents(app: &mut ChatApp, ui: &mut Ui, busy: bool) {
    ui.label(RichText::new("Connect to a chat server").heading());
    ui.label(RichText::new("testbed chat").color(theme::TEXT_WEAK));
    ui.add_space(14.0);
    let mut submit = false;
    egui::Grid::new("connect-form")
        .num_columns(2)
        .spacing([14.0, 10.0])
        .show(ui, |ui| {
            for (name, value, hint) in [
                ("Host", &mut app.form.host, "127.0.0.1"),
                ("Port", &mut app.form.port, "7000"),
                ("Nickname", &mut app.form.nick, "your name"),
            ] {
                let label = ui.label(RichText::new(name).color(theme::TEXT_WEAK));
                let edit = ui
                    .add_enabled(
                        !busy,
                        TextEdit::singleline(value)
                            .hint_text(hint)
                            .desired_width(240.0)
                            .margin(Margin::symmetric(8, 5)),
                    )
                    .labelled_by(label.id);
                if edit.lost_focus() && ui.input(|i| i.key_pressed(Key::Enter)) {
                    submit = true;
                }
                if name == "Nickname" && std::mem::take(&mut app.focus_nick) {
                    edit.request_focus();
                }
                ui.end_row();
            }
        });
    ui.add_space(6.0);
    let problem = app
        .form_error
        .clone()
        .or_else(|| app.state.error.clone())
        .filter(|_| !busy);
    if let Some(problem) = problem {
        ui.add(Label::new(RichText::new(problem).color(theme::ERROR_RED)).wrap());
    }
    if let Some(warning) = &app.settings_warning {
        ui.add(Label::new(RichText::new(warning).small().color(theme::WARN_AMBER)).wrap());
    }
    ui.add_space(10.0);
    ui.horizontal(|ui| {
        let connect = Button::new(RichText::new("Connect").color(egui::Color32::WHITE))
            .fill(theme::ACCENT)
            .min_size(egui::vec2(110.0, 32.0));
        if ui.add_enabled(!busy, connect).clicked() {
            submit = true;
        }
        if busy {
            ui.add(egui::Spinner::new());
            ui.label(
                RichText::new(format!("Connecting to {}…", app.state.target))
                    .color(theme::TEXT_WEAK),
            );
        }
    });
    if submit && !busy {
        let ctx = ui.ctx().clone();
        app.submit_form(&ctx);
    }
}

fn chat(app: &mut ChatApp, ui: &mut Ui) {
    let bar = Frame::new()
        .fill(theme::PANEL)
        .inner_margin(Margin::symmetric(14, 8));
    egui::Panel::top("header")
        .frame(bar)
        .show(ui, |ui| header(app, ui));
    egui::Panel::bottom("status")
        .frame(
            Frame::new()
                .fill(theme::BACKGROUND)
                .inner_margin(Margin::symmetric(14, 5)),
        )
        .show(ui, |ui| status_bar(app, ui));
    egui::Panel::bottom("composer")
        .frame(
            Frame::new()
                .fill(theme::PANEL)
                .inner_margin(Margin::symmetric(14, 10)),
        )
        .show(ui, |ui| composer(app, ui));
    egui::Panel::right("users")
        .resizable(false)
        .exact_size(190.0)
        .frame(
            Frame::new()
                .fill(theme::PANEL)
                .inner_margin(Margin::symmetric(14, 12)),
        )
        .show(ui, |ui| user_list(app, ui));
    egui::CentralPanel::default()
        .frame(
            Frame::new()
                .fill(theme::BACKGROUND)
                .inner_margin(Margin::symmetric(14, 10)),
        )
        .show(ui, |ui| {
            banner(app, ui);
            messages(app, ui);
        });
}

fn header(app: &mut ChatApp, ui: &mut Ui) {
    ui.horizontal(|ui| {
        ui.label(RichText::new("testbed chat").heading());
        if !app.state.target.is_empty() {
            ui.label(RichText::new(&app.state.target).color(theme::TEXT_WEAK));
        }
        ui.with_layout(Layout::right_to_left(Align::Center), |ui| {
            if ui.button("Change server").clicked() {
                app.change_server();
            }
        });
    });
}

fn status_bar(app: &ChatApp, ui: &mut Ui) {
    let s = &app.state;
    let (colour, text) = match s.phase {
        Phase::Idle => (theme::TEXT_WEAK, "Not connected".to_string()),
        Phase::Connecting => (theme::WARN_AMBER, format!("Connecting to {}…", s.target)),
        Phase::Naming => (
            theme::WARN_AMBER,
            format!("Joining {} as {}…", s.target, s.nick),
        ),
        Phase::Chatting => (
            theme::OK_GREEN,
            format!("Connected to {} as {}", s.target, s.nick),
        ),
        Phase::Disconnected => (theme::ERROR_RED, "Disconnected".to_string()),
    };
    ui.horizontal(|ui| {
        dot(ui, colour, 4.0);
        ui.label(RichText::new(text).small().color(theme::TEXT_WEAK));
        if s.phase == Phase::Chatting {
            ui.with_layout(Layout::right_to_left(Align::Center), |ui| {
                ui.label(
                    RichText::new(format!("{} online", s.users.len()))
                        .small()
                        .color(theme::TEXT_WEAK),
                );
            });
        }
    });
}

fn composer(app: &mut ChatApp, ui: &mut Ui) {
    let connected = app.state.phase == Phase::Chatting;
    ui.horizontal(|ui| {
        let send_width = 80.0;
        let hint = if connected {
            "Type a message, Enter sends (/help for commands)"
        } else {
            "Not connected"
        };
        let edit = ui.add_enabled(
            connected,
            TextEdit::singleline(&mut app.input)
                .id_salt("message-input")
                .hint_text(hint)
                .desired_width(ui.available_width() - send_width - 8.0)
                .margin(Margin::symmetric(10, 7)),
        );
        let enter = edit.lost_focus() && ui.input(|i| i.key_pressed(Key::Enter));
        let send = ui.add_enabled(
            connected,
            Button::new(RichText::new("Send").color(egui::Color32::WHITE))
                .fill(theme::ACCENT)
                .min_size(egui::vec2(send_width, 32.0)),
        );
        if enter || send.clicked() {
            app.send_input();
        }
        if connected && std::mem::take(&mut app.focus_input) || enter {
            edit.request_focus();
        }
    });
}

fn user_list(app: &ChatApp, ui: &mut Ui) {
    ui.label(
        RichText::new(format!("ONLINE — {}", app.state.users.len()))
            .small()
            .color(theme::TEXT_WEAK),
    );
    ui.add_space(6.0);
    ScrollArea::vertical()
        .auto_shrink([false, false])
        .show(ui, |ui| {
            for user in &app.state.users {
                ui.horizontal(|ui| {
                    dot(ui, nick_colour(user), 4.5);
                    ui.label(RichText::new(user).color(nick_colour(user)));
                    if *user == app.state.nick {
                        ui.label(RichText::new("(you)").small().color(theme::TEXT_WEAK));
                    }
                });
            }
        });
}

fn banner(app: &mut ChatApp, ui: &mut Ui) {
    let (colour, text, reconnect) = match app.state.phase {
        Phase::Disconnected => (
            theme::ERROR_RED,
            app.state
                .error
                .clone()
                .unwrap_or_else(|| "Disconnected".into()),
            true,
        ),
        Phase::Connecting | Phase::Naming => (
            theme::WARN_AMBER,
            format!("Connecting to {}…", app.state.target),
            false,
        ),
        Phase::Idle | Phase::Chatting => return,
    };
    Frame::new()
        .fill(colour.gamma_multiply(0.12))
        .stroke(Stroke::new(1.0, colour.gamma_multiply(0.7)))
        .corner_radius(CornerRadius::same(6))
        .inner_margin(Margin::symmetric(12, 8))
        .show(ui, |ui| {
            ui.set_width(ui.available_width());
            ui.horizontal(|ui| {
                if reconnect {
                    let button = ui.add(
                        Button::new(RichText::new("Reconnect").color(egui::Color32::WHITE))
                            .fill(theme::ACCENT),
                    );
                    ui.add(Label::new(RichText::new(capitalised(&text)).color(colour)).wrap());
                    if button.clicked() {
                        let ctx = ui.ctx().clone();
                        app.reconnect(&ctx);
                    }
                } else {
                    ui.add(egui::Spinner::new());
                    ui.label(RichText::new(text).color(colour));
                }
            });
        });
    ui.add_space(8.0);
}

fn messages(app: &ChatApp, ui: &mut Ui) {
    ScrollArea::vertical()
        .auto_shrink([false, false])
        .stick_to_bottom(true)
        .show(ui, |ui| {
            ui.spacing_mut().item_spacing.y = 5.0;
            let mut in_history = false;
            for entry in &app.state.entries {
                let earlier = matches!(entry.kind, EntryKind::Message { earlier: true, .. });
                if earlier && !in_history {
                    divider(ui, "earlier messages");
                }
                if !earlier && in_history {
                    divider(ui, "");
                }
                in_history = earlier;
                entry_row(ui, entry, &app.state.nick);
            }
        });
}

fn entry_row(ui: &mut Ui, entry: &Entry, own: &str) {
    let body = FontId::proportional(15.0);
    let time = entry.at.with_timezone(&Local).format("%H:%M").to_string();
    let mut job = LayoutJob::default();
    let mut add = |text: &str, color: egui::Color32, italics: bool| {
        job.append(
            text,
            0.0,
            TextFormat {
                font_id: body.clone(),
                color,
                italics,
                ..Default::default()
            },
        );
    };
    match &entry.kind {
        EntryKind::Message {
            nick,
            text,
            earlier,
        } => {
            let colour = nick_colour(nick);
            add(nick, colour, false);
            add("  ", theme::TEXT, false);
            let text_colour = if *earlier {
                theme::TEXT_WEAK
            } else if nick == own {
                theme::TEXT.gamma_multiply(0.92)
            } else {
                theme::TEXT
            };
            add(text, text_colour, false);
        }
        EntryKind::Joined { nick } => {
            add(nick, nick_colour(nick), false);
            add(" joined", theme::TEXT_WEAK, false);
        }
        EntryKind::Left { nick, reason } => {
            add(nick, nick_colour(nick), false);
            let why = match reason {
                LeaveReason::Quit => " left",
                LeaveReason::Closed => " left (connection closed)",
                LeaveReason::Dropped => " was dropped (stopped reading)",
                LeaveReason::Error => " left (connection error)",
                LeaveReason::TimedOut => " was cut off (a line left unfinished)",
            };
            add(why, theme::TEXT_WEAK, false);
        }
        EntryKind::Renamed { old, new } => {
            add(old, nick_colour(old), false);
            add(" is now ", theme::TEXT_WEAK, false);
            add(new, nick_colour(new), false);
        }
        EntryKind::Info(text) => add(text, theme::TEXT_WEAK, true),
        EntryKind::Problem(text) => add(text, theme::ERROR_RED, false),
    }
    ui.horizontal_top(|ui| {
        // The time is smaller than the text; painted by hand on the text's baseline, since a
        // top-aligned row would lift it above the name next to it.
        let galley = ui.painter().layout_no_wrap(
            time,
            FontId::monospace(13.0),
            theme::TEXT_WEAK.gamma_multiply(0.8),
        );
        let row_height = ui.fonts_mut(|f| f.row_height(&body));
        let size = egui::vec2(galley.size().x, row_height);
        let (rect, response) = ui.allocate_exact_size(size, egui::Sense::hover());
        let drop = (row_height - galley.size().y) * 0.7;
        ui.painter().galley(
            rect.left_top() + egui::vec2(0.0, drop),
            galley,
            theme::TEXT_WEAK,
        );
        response.on_hover_text(
            entry
                .at
                .with_timezone(&Local)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string(),
        );
        ui.add(Label::new(job).wrap());
    });
}

fn divider(ui: &mut Ui, text: &str) {
    ui.add_space(6.0);
    let width = ui.available_width();
    let (rect, _) = ui.allocate_exact_size(egui::vec2(width, 14.0), egui::Sense::hover());
    let mut x = rect.left();
    if !text.is_empty() {
        let galley = ui.painter().layout_no_wrap(
            text.to_string(),
            FontId::proportional(12.0),
            theme::TEXT_WEAK,
        );
        let top = rect.center().y - galley.size().y / 2.0;
        x += galley.size().x + 8.0;
        ui.painter()
            .galley(egui::pos2(rect.left(), top), galley, theme::TEXT_WEAK);
    }
    ui.painter().hline(
        x..=rect.right(),
        rect.center().y,
        Stroke::new(1.0, theme::BORDER),
    );
}

fn dot(ui: &mut Ui, colour: egui::Color32, radius: f32) {
    let (rect, _) = ui.allocate_exact_size(
        egui::vec2(radius * 2.0 + 2.0, radius * 2.0),
        egui::Sense::hover(),
    );
    ui.painter().circle_filled(rect.center(), radius, colour);
}

fn capitalised(text: &str) -> String {
    crate::app::capitalise(text)
}
