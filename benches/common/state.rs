//! The relay-state workload shared by the `state` bench and the `state` part of the
//! `memory` bench: NetBots-like key names and short text values. Included with
//! `#[path = "common/state.rs"] mod state_load;` (it is not part of `common`).

#![allow(dead_code)]

/// Key names, NetBots-like; [`T_KEY`] (the send time, in the `state` bench) comes last.
pub const KEY_NAMES: [&str; 21] = [
    "hp",
    "mana",
    "end",
    "pet_hp",
    "target",
    "target_hp",
    "casting",
    "zone",
    "loc",
    "heading",
    "level",
    "class",
    "group",
    "aggro",
    "buffs",
    "debuffs",
    "combat",
    "sitting",
    "invis",
    "xp",
    "aa",
];

/// The key whose value is the send time.
pub const T_KEY: &str = "t";

/// `n` key names: `n - 1` from [`KEY_NAMES`] (then `kNN`), and [`T_KEY`] last.
pub fn key_names(n: usize) -> Vec<String> {
    let n = n.max(1);
    let mut keys: Vec<String> = (0..n - 1)
        .map(|k| {
            KEY_NAMES
                .get(k)
                .map_or_else(|| format!("k{k:02}"), |s| s.to_string())
        })
        .collect();
    keys.push(T_KEY.into());
    keys
}

/// A short text value of key number `key`, 10 to 30 bytes by key, different for every
/// `version` (and, with `salt`, for every shim).
pub fn value_of(key: usize, version: u64, salt: usize) -> String {
    let len = 10 + (key * 7) % 21;
    let mut v = format!("{version}/{}", 4000 + key * 37 + salt % 1000);
    while v.len() < len {
        v.push(if v.len() % 2 == 0 { ' ' } else { '.' });
    }
    v
}
