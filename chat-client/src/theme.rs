//! The look: a dark theme with a little more air than egui's default, text sizes for reading chat,
//! and one stable colour per nickname so a speaker is recognisable at a glance.

use egui::{Color32, CornerRadius, FontFamily, FontId, Stroke, TextStyle, Visuals};

/// Accent for the primary button and focus rings.
pub const ACCENT: Color32 = Color32::from_rgb(0x3d, 0x8b, 0xfd);
pub const OK_GREEN: Color32 = Color32::from_rgb(0x3f, 0xb9, 0x50);
pub const WARN_AMBER: Color32 = Color32::from_rgb(0xe3, 0xa0, 0x08);
pub const ERROR_RED: Color32 = Color32::from_rgb(0xf8, 0x51, 0x49);
pub const PANEL: Color32 = Color32::from_rgb(0x16, 0x1b, 0x22);
pub const BACKGROUND: Color32 = Color32::from_rgb(0x0d, 0x11, 0x17);
pub const CARD: Color32 = Color32::from_rgb(0x1c, 0x22, 0x2b);
pub const BORDER: Color32 = Color32::from_rgb(0x30, 0x36, 0x3d);
pub const TEXT: Color32 = Color32::from_rgb(0xe6, 0xed, 0xf3);
pub const TEXT_WEAK: Color32 = Color32::from_rgb(0x8b, 0x94, 0x9e);

/// Readable on the dark background and distinct from each other.
const NICK_COLOURS: [Color32; 10] = [
    Color32::from_rgb(0x58, 0xa6, 0xff),
    Color32::from_rgb(0xff, 0x9b, 0x5e),
    Color32::from_rgb(0x56, 0xd3, 0x64),
    Color32::from_rgb(0xd2, 0x8c, 0xf5),
    Color32::from_rgb(0xf2, 0xcc, 0x60),
    Color32::from_rgb(0x39, 0xc5, 0xcf),
    Color32::from_rgb(0xff, 0x7b, 0xa8),
    Color32::from_rgb(0xa5, 0xd6, 0x5a),
    Color32::from_rgb(0x9d, 0xa5, 0xff),
    Color32::from_rgb(0xf0, 0x88, 0x72),
];

/// The colour of `nick`: the same in every client and every run (FNV-1a of the lower-case name,
/// since the server treats names without regard to case).
pub fn nick_colour(nick: &str) -> Color32 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in nick.bytes() {
        hash ^= u32::from(b.to_ascii_lowercase());
        hash = hash.wrapping_mul(0x0100_0193);
    }
    NICK_COLOURS[hash as usize % NICK_COLOURS.len()]
}

/// Installs the theme on a context (once; egui keeps it).
pub fn apply(ctx: &egui::Context) {
    let mut visuals = Visuals::dark();
    visuals.panel_fill = PANEL;
    visuals.window_fill = CARD;
    visuals.extreme_bg_color = BACKGROUND;
    visuals.faint_bg_color = CARD;
    visuals.override_text_color = Some(TEXT);
    visuals.hyperlink_color = ACCENT;
    visuals.selection.bg_fill = ACCENT.gamma_multiply(0.6);
    visuals.selection.stroke = Stroke::new(1.0, TEXT);
    visuals.window_stroke = Stroke::new(1.0, BORDER);
    visuals.widgets.noninteractive.bg_stroke = Stroke::new(1.0, BORDER);
    let radius = CornerRadius::same(6);
    for w in [
        &mut visuals.widgets.inactive,
        &mut visuals.widgets.hovered,
        &mut visuals.widgets.active,
        &mut visuals.widgets.open,
        &mut visuals.widgets.noninteractive,
    ] {
        w.corner_radius = radius;
    }
    visuals.widgets.inactive.bg_stroke = Stroke::new(1.0, BORDER);
    visuals.widgets.hovered.bg_stroke = Stroke::new(1.0, ACCENT.gamma_multiply(0.8));
    visuals.widgets.active.bg_stroke = Stroke::new(1.0, ACCENT);
    ctx.set_visuals_of(egui::Theme::Dark, visuals);
    ctx.set_theme(egui::Theme::Dark);

    ctx.all_styles_mut(|style| {
        style.text_styles = [
            (
                TextStyle::Heading,
                FontId::new(20.0, FontFamily::Proportional),
            ),
            (TextStyle::Body, FontId::new(15.0, FontFamily::Proportional)),
            (
                TextStyle::Button,
                FontId::new(15.0, FontFamily::Proportional),
            ),
            (
                TextStyle::Small,
                FontId::new(12.0, FontFamily::Proportional),
            ),
            (
                TextStyle::Monospace,
                FontId::new(13.5, FontFamily::Monospace),
            ),
        ]
        .into();
        style.spacing.item_spacing = egui::vec2(8.0, 6.0);
        style.spacing.button_padding = egui::vec2(12.0, 5.0);
        style.spacing.interact_size.y = 28.0;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_are_stable_and_ignore_case() {
        assert_eq!(nick_colour("alice"), nick_colour("Alice"));
        assert_eq!(nick_colour("alice"), nick_colour("alice"));
        // Different people usually differ (these two are known to).
        assert_ne!(nick_colour("alice"), nick_colour("bob"));
        // Fixed values, so a change of the function is noticed (every client must agree).
        assert_eq!(nick_colour("alice"), Color32::from_rgb(0xf0, 0x88, 0x72));
        assert_eq!(nick_colour("bob"), Color32::from_rgb(0xf2, 0xcc, 0x60));
        assert_eq!(nick_colour("carol"), Color32::from_rgb(0x56, 0xd3, 0x64));
    }
}
