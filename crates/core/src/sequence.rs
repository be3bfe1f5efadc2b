//! Triton's sequence parameters (`sequence_id`, `sequence_start`, `sequence_end`), read
//! the same way by the gateway (sticky sequences) and the worker (its sequence batcher),
//! and the turnstile that keeps a stream's messages of one sequence in arrival order.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use infermesh_proto::infer_parameter::ParameterChoice;

use crate::{raw::Parameters, Error};

/// A sequence's id: Triton's correlation id, an integer or a string.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Id {
    Int(u64),
    Text(String),
}

/// A request's place in a sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sequence {
    pub id: Id,
    /// The id as a key: `i:N` or `s:TEXT`.
    pub key: String,
    pub start: bool,
    pub end: bool,
}

impl Sequence {
    /// The id as a user wrote it, for messages.
    pub fn shown(&self) -> String {
        match &self.id {
            Id::Int(n) => n.to_string(),
            Id::Text(s) => format!("'{}'", crate::text::clip(s)),
        }
    }
}

/// The longest string `sequence_id` taken: the gateway's and the worker's tables hold
/// each open one.
pub const MAX_ID_BYTES: usize = 256;

/// Triton's sequence parameters of a request: None without a `sequence_id` (0 and "" are
/// none, as in Triton); an id of another type, or a negative one, is refused naming it.
pub fn of(parameters: &Parameters) -> Result<Option<Sequence>, Error> {
    let Some(id) = parameters.get("sequence_id") else {
        return Ok(None);
    };
    let id = match &id.parameter_choice {
        Some(ParameterChoice::Int64Param(0)) | Some(ParameterChoice::Uint64Param(0)) => None,
        Some(ParameterChoice::Int64Param(n)) if *n < 0 => {
            return Err(Error::InvalidArgument(format!(
                "parameter 'sequence_id': expected a positive integer or a string, found {n}"
            )))
        }
        Some(ParameterChoice::Int64Param(n)) => Some(Id::Int(*n as u64)),
        Some(ParameterChoice::Uint64Param(n)) => Some(Id::Int(*n)),
        Some(ParameterChoice::StringParam(s)) if s.is_empty() => None,
        Some(ParameterChoice::StringParam(s)) if s.len() > MAX_ID_BYTES => {
            return Err(Error::InvalidArgument(format!(
                "parameter 'sequence_id': expected a string of at most {MAX_ID_BYTES} bytes, found {} bytes",
                s.len()
            )))
        }
        Some(ParameterChoice::StringParam(s)) => Some(Id::Text(s.clone())),
        _ => {
            return Err(Error::InvalidArgument(
                "parameter 'sequence_id': expected an integer or a string".into(),
            ))
        }
    };
    let flag = |name: &str| match parameters
        .get(name)
        .and_then(|p| p.parameter_choice.as_ref())
    {
        None => Ok(false),
        Some(ParameterChoice::BoolParam(b)) => Ok(*b),
        Some(_) => Err(Error::InvalidArgument(format!(
            "parameter '{name}': expected a bool"
        ))),
    };
    let (start, end) = (flag("sequence_start")?, flag("sequence_end")?);
    Ok(id.map(|id| Sequence {
        key: match &id {
            Id::Int(n) => format!("i:{n}"),
            Id::Text(s) => format!("s:{s}"),
        },
        id,
        start,
        end,
    }))
}

/// Keeps one stream's messages of each sequence in the order they arrived: a message
/// takes a ticket when it is read (in order), and its handling starts only once every
/// earlier message of its sequence has been answered. Messages of other sequences, and
/// those of none, are not held.
#[derive(Clone, Default)]
pub struct Turnstile(Arc<Mutex<HashMap<(String, String), Gate>>>);

struct Gate {
    /// The next ticket to hand out, and the one whose turn it is.
    next: u64,
    turn: tokio::sync::watch::Sender<u64>,
    /// Tickets dropped before their turn (cancelled): skipped when the turn reaches them.
    gone: std::collections::BTreeSet<u64>,
}

/// A message's place in its sequence's line. Dropping it (answered, failed or
/// cancelled) lets the next one go.
pub struct Ticket {
    gates: Turnstile,
    key: (String, String),
    number: u64,
    turn: tokio::sync::watch::Receiver<u64>,
}

impl Turnstile {
    /// A ticket for a message to `model` of sequence `key`, taken in arrival order.
    pub fn ticket(&self, model: &str, key: &str) -> Ticket {
        let key = (model.to_string(), key.to_string());
        let mut gates = self.0.lock().expect("turnstile lock");
        let gate = gates.entry(key.clone()).or_insert_with(|| Gate {
            next: 0,
            turn: tokio::sync::watch::channel(0).0,
            gone: Default::default(),
        });
        let number = gate.next;
        gate.next += 1;
        Ticket {
            gates: self.clone(),
            key,
            number,
            turn: gate.turn.subscribe(),
        }
    }
}

impl Ticket {
    /// Waits until every earlier message of the sequence has been answered.
    pub async fn turn(&mut self) {
        let number = self.number;
        // The sender lives in the table until the last ticket is gone.
        let _ = self.turn.wait_for(|&t| t >= number).await;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut gates = self.gates.0.lock().expect("turnstile lock");
        let Some(gate) = gates.get_mut(&self.key) else {
            return;
        };
        // A ticket dropped before its turn (cancelled) is skipped when the turn reaches
        // it: the turn never passes a ticket still waiting.
        gate.gone.insert(self.number);
        let mut turn = *gate.turn.borrow();
        while gate.gone.remove(&turn) {
            turn += 1;
        }
        gate.turn.send_replace(turn);
        if turn >= gate.next {
            gates.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;
    use infermesh_proto::InferParameter;

    use super::*;

    fn params(id: ParameterChoice, start: bool, end: bool) -> Parameters {
        let p = |c| InferParameter {
            parameter_choice: Some(c),
        };
        [
            ("sequence_id".to_string(), p(id)),
            (
                "sequence_start".to_string(),
                p(ParameterChoice::BoolParam(start)),
            ),
            (
                "sequence_end".to_string(),
                p(ParameterChoice::BoolParam(end)),
            ),
        ]
        .into()
    }

    #[test]
    fn ids_are_integers_or_strings_and_zero_is_none() {
        let s = of(&params(ParameterChoice::Int64Param(7), true, false))
            .unwrap()
            .unwrap();
        assert_eq!((s.key.as_str(), s.start, s.end), ("i:7", true, false));
        assert_eq!(s.id, Id::Int(7));
        let s = of(&params(
            ParameterChoice::StringParam("abc".into()),
            false,
            true,
        ))
        .unwrap()
        .unwrap();
        assert_eq!((s.key.as_str(), s.end), ("s:abc", true));
        assert!(of(&params(ParameterChoice::Int64Param(0), true, false))
            .unwrap()
            .is_none());
        assert!(of(&Parameters::new()).unwrap().is_none());
        let err = of(&params(ParameterChoice::BoolParam(true), true, false)).unwrap_err();
        assert!(err.to_string().contains("sequence_id"), "{err:?}");
        let mut odd = params(ParameterChoice::Int64Param(3), true, false);
        odd.insert(
            "sequence_end".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(1)),
            },
        );
        let err = of(&odd).unwrap_err();
        assert!(
            err.to_string()
                .contains("parameter 'sequence_end': expected a bool"),
            "{err:?}"
        );
        let err = of(&params(ParameterChoice::Int64Param(-3), true, false)).unwrap_err();
        assert!(err.to_string().contains("found -3"), "{err:?}");
        let long = "x".repeat(MAX_ID_BYTES + 1);
        let err = of(&params(ParameterChoice::StringParam(long), true, false)).unwrap_err();
        assert!(
            err.to_string().contains("at most 256 bytes, found 257"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn tickets_of_one_sequence_go_in_order_and_others_do_not_wait() {
        let gates = Turnstile::default();
        let mut a1 = gates.ticket("m", "i:1");
        let mut a2 = gates.ticket("m", "i:1");
        let mut b1 = gates.ticket("m", "i:2");
        let mut a3 = gates.ticket("m", "i:1");
        a1.turn().await;
        b1.turn().await;
        let waiting = tokio::spawn(async move {
            a3.turn().await;
        });
        // a2 cannot go until a1 is answered.
        assert!(a2.turn().now_or_never().is_none());
        drop(a1);
        a2.turn().await;
        assert!(!waiting.is_finished());
        drop(a2);
        waiting.await.unwrap();
        drop(b1);
        assert!(
            gates.0.lock().unwrap().is_empty(),
            "no gate outlives its tickets"
        );
        // A ticket cancelled before its turn lets the next one through in order.
        let first = gates.ticket("m", "i:1");
        let cancelled = gates.ticket("m", "i:1");
        let mut third = gates.ticket("m", "i:1");
        drop(cancelled);
        assert!(
            third.turn().now_or_never().is_none(),
            "not before the first"
        );
        drop(first);
        third.turn().await;
        drop(third);
        assert!(gates.0.lock().unwrap().is_empty());
    }
}
