//! `meterflow._core`: bytes in, one compact batch object out.
//!
//! The Python package calls this in one place (`meterflow.kernel.rust`); the
//! GIL is released while a batch is decoded.

pub mod decimal;
pub mod decode;
pub mod dedup;
pub mod identity;
pub mod json;
pub mod resp;

use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

use decode::{Decoded, Limits};

// Batches allocate and free a few hundred kilobytes per request; mimalloc
// keeps that memory instead of faulting fresh pages in each time (as
// pydantic-core does).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

create_exception!(
    _core,
    DecodeError,
    PyValueError,
    "The request as a whole is rejected; args are (code, message)."
);

create_exception!(
    _core,
    ReplyError,
    PyValueError,
    "Redis answered the dedup pipeline with an error or an unexpected reply."
);

/// The event contract's limits, built once at start.
#[pyclass(frozen, module = "meterflow._core", name = "Limits")]
#[derive(Clone)]
struct PyLimits {
    inner: Limits,
}

#[pymethods]
impl PyLimits {
    #[new]
    #[pyo3(signature = (*, max_events=1000, max_future_ms=300_000, max_age_ms=2_592_000_000,
        max_id_len=255, max_event_type_len=100, max_property_value_len=1000,
        max_property_key_len=255, max_properties=100, max_depth=64))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        max_events: usize,
        max_future_ms: i64,
        max_age_ms: i64,
        max_id_len: usize,
        max_event_type_len: usize,
        max_property_value_len: usize,
        max_property_key_len: usize,
        max_properties: usize,
        max_depth: usize,
    ) -> PyResult<Self> {
        if max_events == 0 || max_id_len == 0 || max_event_type_len == 0 || max_depth < 3 {
            return Err(PyValueError::new_err(
                "max_events, max_id_len and max_event_type_len must be positive and max_depth at least 3",
            ));
        }
        if max_future_ms < 0 || max_age_ms < 0 {
            return Err(PyValueError::new_err(
                "max_future_ms and max_age_ms must not be negative",
            ));
        }
        Ok(PyLimits {
            inner: Limits {
                max_events,
                max_future_ms,
                max_age_ms,
                max_id_len,
                max_event_type_len,
                max_property_value_len,
                max_property_key_len,
                max_properties,
                max_depth,
            },
        })
    }

    #[getter]
    fn max_events(&self) -> usize {
        self.inner.max_events
    }
    #[getter]
    fn max_future_ms(&self) -> i64 {
        self.inner.max_future_ms
    }
    #[getter]
    fn max_age_ms(&self) -> i64 {
        self.inner.max_age_ms
    }
    #[getter]
    fn max_id_len(&self) -> usize {
        self.inner.max_id_len
    }
    #[getter]
    fn max_event_type_len(&self) -> usize {
        self.inner.max_event_type_len
    }
    #[getter]
    fn max_property_value_len(&self) -> usize {
        self.inner.max_property_value_len
    }
    #[getter]
    fn max_property_key_len(&self) -> usize {
        self.inner.max_property_key_len
    }
    #[getter]
    fn max_properties(&self) -> usize {
        self.inner.max_properties
    }
}

/// The outcome of one decoded batch.
#[pyclass(frozen, module = "meterflow._core")]
struct Batch {
    d: Decoded,
}

fn keep_mask<'a>(d: &Decoded, keep: Option<&'a [u8]>) -> PyResult<Option<&'a [u8]>> {
    if let Some(k) = keep {
        if k.len() != d.len() {
            return Err(PyValueError::new_err(format!(
                "keep has {} entries for {} events",
                k.len(),
                d.len()
            )));
        }
    }
    Ok(keep)
}

/// The spans of the kept events, written straight into a new `bytes`.
fn select_bytes<'py>(
    py: Python<'py>,
    buf: &[u8],
    offsets: &[u32],
    keep: Option<&[u8]>,
) -> PyResult<Bound<'py, PyBytes>> {
    let Some(mask) = keep else {
        return Ok(PyBytes::new(py, buf));
    };
    let spans = || {
        mask.iter()
            .enumerate()
            .filter(|(_, &k)| k != 0)
            .map(|(i, _)| offsets[i] as usize..offsets[i + 1] as usize)
    };
    let len = spans().map(|r| r.len()).sum();
    PyBytes::new_with(py, len, |out| {
        let mut at = 0;
        for r in spans() {
            out[at..at + r.len()].copy_from_slice(&buf[r.clone()]);
            at += r.len();
        }
        Ok(())
    })
}

#[pymethods]
impl Batch {
    fn __len__(&self) -> usize {
        self.d.len()
    }

    /// Events in the request, valid or not.
    #[getter]
    fn received(&self) -> usize {
        self.d.received
    }

    #[getter]
    fn in_batch_duplicates(&self) -> usize {
        self.d.in_batch_duplicates
    }

    #[getter]
    fn transaction_ids<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, (0..self.d.len()).map(|i| self.d.id(i)))
    }

    #[getter]
    fn failed<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let items = self
            .d
            .failed
            .iter()
            .map(|f| (f.index, f.transaction_id.as_deref(), f.reason.as_str()).into_pyobject(py))
            .collect::<PyResult<Vec<Bound<'py, PyTuple>>>>()?;
        PyList::new(py, items)
    }

    /// One sentence per entry of `failed`, in the same order.
    #[getter]
    fn failure_messages<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.d.failed.iter().map(|f| f.message.as_str()))
    }

    fn transaction_id(&self, i: usize) -> PyResult<&str> {
        if i >= self.d.len() {
            return Err(PyValueError::new_err("event index out of range"));
        }
        Ok(self.d.id(i))
    }

    /// The position in the request's `events` array of valid event `i`.
    fn request_index(&self, i: usize) -> PyResult<usize> {
        self.d
            .request_index
            .get(i)
            .map(|&x| x as usize)
            .ok_or_else(|| PyValueError::new_err("event index out of range"))
    }

    /// The kept events as ClickHouse RowBinary rows of (transaction_id,
    /// customer_id, event_type, timestamp_ms, ts, properties, num_keys,
    /// num_values, str_keys, str_values).
    #[pyo3(signature = (keep=None))]
    fn storage_rows<'py>(
        &self,
        py: Python<'py>,
        keep: Option<&[u8]>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        select_bytes(
            py,
            &self.d.rows,
            &self.d.row_offsets,
            keep_mask(&self.d, keep)?,
        )
    }

    /// The kept events as NDJSON, one canonical JSON event per line.
    #[pyo3(signature = (keep=None))]
    fn archive_lines<'py>(
        &self,
        py: Python<'py>,
        keep: Option<&[u8]>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        select_bytes(
            py,
            &self.d.archive,
            &self.d.archive_offsets,
            keep_mask(&self.d, keep)?,
        )
    }

    /// The text of valid event `i`'s idempotency key, a hash of
    /// (customer_id, transaction_id): 22 characters of the id alphabet.
    fn key(&self, i: usize) -> PyResult<String> {
        let k = self
            .d
            .keys
            .get(i)
            .ok_or_else(|| PyValueError::new_err("event index out of range"))?;
        Ok(String::from_utf8_lossy(&identity::text::<{ identity::KEY_CHARS }>(*k)).into_owned())
    }

    /// The text of valid event `i`'s content fingerprint: 16 characters.
    fn fingerprint(&self, i: usize) -> PyResult<String> {
        let f = self
            .d
            .fingerprints
            .get(i)
            .ok_or_else(|| PyValueError::new_err("event index out of range"))?;
        Ok(
            String::from_utf8_lossy(&identity::text::<{ identity::FINGERPRINT_CHARS }>(*f))
                .into_owned(),
        )
    }

    /// RESP bytes of one `SET <prefix><key> <flush_id>|<fingerprint> NX EX <ttl> GET` per event.
    fn redis_reserve<'py>(
        &self,
        py: Python<'py>,
        prefix: &str,
        flush_id: &str,
        ttl_seconds: u64,
    ) -> Bound<'py, PyBytes> {
        let out = py.detach(|| resp::reserve_commands(&self.d, prefix, flush_id, ttl_seconds));
        PyBytes::new(py, &out)
    }

    /// Parses the replies to `redis_reserve`: None until all are in `data`,
    /// then per key that was already held: (event index, the flush holding
    /// it, the fields in which its event differs from this one as bits of
    /// 1 event_type, 2 timestamp, 4 properties; 0 when the same).
    fn reserve_replies<'py>(&self, py: Python<'py>, data: &[u8]) -> PyResult<Option<PyTaken<'py>>> {
        match resp::parse_set_get_replies(data, self.d.len()) {
            Ok(None) => Ok(None),
            Ok(Some(v)) => Ok(Some(
                v.into_iter()
                    .map(|(i, old)| {
                        let (holder, fp) = resp::split_value(&old);
                        let differs =
                            fp.map_or(0, |f| identity::differing(f, self.d.fingerprints[i]));
                        (i, PyBytes::new(py, holder), differs)
                    })
                    .collect(),
            )),
            Err(resp::ReplyError::Server(m)) => {
                Err(ReplyError::new_err(format!("Redis error: {m}")))
            }
            Err(resp::ReplyError::Protocol(m)) => Err(ReplyError::new_err(m)),
        }
    }
}

/// Decodes, validates and encodes a whole batch with the GIL released.
#[pyfunction]
#[pyo3(signature = (body, now_ms, limits=None, customer_id=None))]
fn decode_batch(
    py: Python<'_>,
    body: &[u8],
    now_ms: i64,
    limits: Option<&Bound<'_, PyLimits>>,
    customer_id: Option<&str>,
) -> PyResult<Batch> {
    let limits = limits.map_or_else(Limits::default, |l| l.get().inner.clone());
    let result = py.detach(|| decode::decode_for(body, now_ms, &limits, customer_id));
    match result {
        Ok(d) => Ok(Batch { d }),
        Err(e) => Err(DecodeError::new_err((e.code(), e.message()))),
    }
}

type PyTaken<'py> = Vec<(usize, Bound<'py, PyBytes>, u8)>;

/// The names of the fields in a `differs` bit set, e.g. "timestamp, properties".
#[pyfunction]
fn conflict_fields(differs: u8) -> String {
    identity::field_names(differs)
}

/// The embedded mode's dedup index (one process owns the data path).
#[pyclass(module = "meterflow._core")]
struct DedupIndex {
    ix: dedup::Index,
}

#[pymethods]
impl DedupIndex {
    #[new]
    fn new() -> Self {
        DedupIndex {
            ix: dedup::Index::default(),
        }
    }

    fn __len__(&self) -> usize {
        self.ix.len()
    }

    /// One code per valid event: 0 reserved now, 1 duplicate, 2 in flight,
    /// 16 + the differing fields' bits for a conflict.
    fn reserve<'py>(&mut self, py: Python<'py>, batch: &Batch, flush: u64) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.ix.reserve(&batch.d, flush))
    }

    fn commit(&mut self, flush: u64, now_s: u32) {
        self.ix.commit(flush, now_s);
    }

    fn release(&mut self, flush: u64) {
        self.ix.release(flush);
    }

    /// Marks a batch's events as committed (warming from storage).
    fn load(&mut self, batch: &Batch, now_s: u32) {
        self.ix.load(&batch.d, now_s);
    }

    fn expire(&mut self, before_s: u32) -> usize {
        self.ix.expire(before_s)
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(decode_batch, m)?)?;
    m.add_function(wrap_pyfunction!(conflict_fields, m)?)?;
    m.add_class::<Batch>()?;
    m.add_class::<PyLimits>()?;
    m.add_class::<DedupIndex>()?;
    m.add("DecodeError", m.py().get_type::<DecodeError>())?;
    m.add("ReplyError", m.py().get_type::<ReplyError>())?;
    Ok(())
}
