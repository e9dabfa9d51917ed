//! The room's reflection prompts: the current question, and the recent ones a reflection may
//! still answer after the teacher moved on.

use std::collections::{BTreeMap, VecDeque};

use downbeat_protocol::{
    ErrorCode, MAX_MOOD, Prompt, PromptText, Reflection, ReflectionNotice, ReflectionText, TextKind, check_text,
};
use serde::{Deserialize, Serialize};

use super::output::Refused;

/// Prompts a reflection may still answer after the teacher moved on.
const RECENT_PROMPTS: usize = 32;
/// Reflections one student may write to one prompt by default (each stored): a child may add
/// a thought or two, not fill the database.
pub const MAX_REFLECTIONS_PER_PROMPT: usize = 5;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Prompts {
    recent: VecDeque<Prompt>,
    current: Option<Prompt>,
    next_id: u32,
    /// Per recent prompt id, the reflection ids each student wrote to it.
    #[serde(default)]
    answered: BTreeMap<u32, BTreeMap<String, Vec<[u8; 16]>>>,
}

impl Default for Prompts {
    fn default() -> Self {
        Self { recent: VecDeque::new(), current: None, next_id: 1, answered: BTreeMap::new() }
    }
}

/// A reflection that answers one of the room's prompts.
#[derive(Debug)]
pub(crate) struct Checked {
    pub(crate) prompt: PromptText,
    pub(crate) text: Option<ReflectionText>,
}

impl Prompts {
    /// The current prompt, if any.
    pub(crate) fn current(&self) -> Option<&Prompt> {
        self.current.as_ref()
    }

    /// Sets (or, with blank text, clears) the prompt; the new current prompt.
    pub(crate) fn set(&mut self, text: PromptText) -> Result<Option<Prompt>, Refused> {
        if let Err(bad) = check_text(&text, TextKind::Prose) {
            return Err(Refused::new(ErrorCode::BadRequest, format!("a prompt: {bad}")));
        }
        if text.trim().is_empty() {
            self.current = None;
            return Ok(None);
        }
        let prompt = Prompt { id: self.next_id, text };
        self.next_id += 1;
        if self.recent.len() == RECENT_PROMPTS
            && let Some(old) = self.recent.pop_front()
        {
            self.answered.remove(&old.id);
        }
        self.recent.push_back(prompt.clone());
        self.current = Some(prompt.clone());
        Ok(Some(prompt))
    }

    /// Checks a reflection by `subject`: its text has no control characters but newlines and
    /// tabs, it answers a recent prompt, its mood is in range, it says something (blank text
    /// counts as none), and it is one of the first `most` ids the student wrote to that prompt
    /// (a retry of one of them is no new one). A reflection that passes is counted.
    pub(crate) fn check(&mut self, subject: &str, r: &Reflection, most: usize) -> Result<Checked, Refused> {
        if let Some(Err(bad)) = r.text.as_deref().map(|t| check_text(t, TextKind::Prose)) {
            return Err(Refused::new(ErrorCode::BadRequest, format!("a reflection: {bad}")));
        }
        let Some(prompt) = self.recent.iter().find(|p| p.id == r.prompt_id) else {
            return Err(Refused::new(ErrorCode::NoPrompt, "the teacher has not asked this question in this room"));
        };
        if r.mood.is_some_and(|m| m > MAX_MOOD) {
            return Err(Refused::new(ErrorCode::BadRequest, "a mood is 0 to 4"));
        }
        let text = r.text.as_ref().filter(|t| !t.trim().is_empty());
        if r.mood.is_none() && text.is_none() {
            return Err(Refused::new(ErrorCode::BadRequest, "a reflection needs a mood, some words, or both"));
        }
        let checked = Checked { prompt: prompt.text.clone(), text: text.cloned() };
        let ids = self.answered.entry(r.prompt_id).or_default().entry(subject.to_owned()).or_default();
        if !ids.contains(&r.id) {
            if ids.len() >= most {
                return Err(Refused::new(
                    ErrorCode::TooManyReflections,
                    format!("you already answered this question {most} times"),
                ));
            }
            ids.push(r.id);
        }
        Ok(checked)
    }

    /// Forgets what `subject` answered (their data is being deleted).
    pub(crate) fn forget(&mut self, subject: &str) {
        for by_subject in self.answered.values_mut() {
            by_subject.remove(subject);
        }
    }
}

/// The feed's notice of a checked reflection by `member_id`.
pub(crate) fn notice(member_id: u64, r: &Reflection, text: Option<ReflectionText>) -> ReflectionNotice {
    ReflectionNotice { member_id, id: r.id, prompt_id: r.prompt_id, mood: r.mood, text }
}
