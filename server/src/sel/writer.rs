//! The SEL write pipeline: a bounded queue in front of the [`Store`], one writer task that
//! commits in groups and retries, the health it reports, and the retention purge.
//!
//! Nothing on the beat or note path ever waits on the database. Rooms and sessions hand work
//! to [`Sel::try_submit`], which never waits: it either queues the job or gives it back at
//! once when the queue is full. The writer takes every job queued (up to [`MAX_GROUP`]) and
//! writes them in one transaction. Each job's `on_commit` runs only after its transaction
//! committed: that is when a reflection is acknowledged and when the teachers' live feed
//! hears about it.
//!
//! How a failed group is handled depends on why it failed:
//!
//! - **The database is unavailable** (unreachable, busy, full, read-only, failing I/O, or
//!   refusing for a reason that is not the rows): the writer keeps the same group and retries
//!   with backoff until it commits, so a job that was queued is stored once the database is
//!   back. Meanwhile it reports itself degraded (health, metrics) and the queue fills; past
//!   its bound, reflections are refused with the retryable `store_unavailable` and rooms keep
//!   their participation counts in memory until a flush is accepted.
//! - **The database refused rows for what they hold** (a constraint, a value it cannot
//!   store: [`StoreError::is_refused_data`]): the writer writes the group's jobs one by one,
//!   so only the job holding those rows fails. Its `on_refuse` runs (a reflection's author
//!   hears `store_refused`), and every other school's and student's writes go on.
//!
//! Writes are idempotent (see [`crate::sel::store`]), so retrying a group whose commit
//! acknowledgement was lost duplicates nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::auth::Tenants;
use crate::sel::store::{Batch, Store, StoreError};
use crate::shutdown::Shutdown;
use crate::stats::Stats;

/// Most jobs written in one transaction.
pub(crate) const MAX_GROUP: usize = 256;
/// First retry delay after a failed write; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// Longest wait between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Runs after the job's rows are committed (on the writer task; must not block).
pub(crate) type OnCommit = Box<dyn FnOnce() + Send>;

/// Rows to store and what to do once they are, or once the database refused them.
pub(crate) struct Job {
    pub(crate) batch: Batch,
    pub(crate) on_commit: Option<OnCommit>,
    /// Runs (on the writer task) if the database refused these rows for what they hold.
    pub(crate) on_refuse: Option<OnCommit>,
}

impl Job {
    /// `batch`, with nothing to run once it is written.
    pub(crate) fn rows(batch: Batch) -> Self {
        Self { batch, on_commit: None, on_refuse: None }
    }
}

/// How writing a batch ended.
enum Written {
    Committed,
    /// The database refused the rows themselves ([`StoreError::is_refused_data`]).
    Refused(StoreError),
    /// Shutdown came while the database was still failing.
    GaveUp,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Row contents are children's data: counts only.
        f.debug_struct("Job")
            .field("sessions", &self.batch.sessions.len())
            .field("participation", &self.batch.participation.len())
            .field("reflections", &self.batch.reflections.len())
            .field("recorded_notes", &self.batch.recorded_notes.len())
            .finish_non_exhaustive()
    }
}

/// What the health endpoint shows of the SEL store.
#[derive(Clone, Debug, serde::Serialize)]
pub(crate) struct Health {
    /// `sqlite` or `postgres`.
    pub(crate) backend: &'static str,
    /// The last write failed and has not succeeded since.
    pub(crate) degraded: bool,
    /// Jobs waiting.
    pub(crate) queued: u64,
    /// Jobs the queue holds before reflections are refused.
    pub(crate) capacity: usize,
}

#[derive(Debug)]
struct Shared {
    degraded: AtomicBool,
    capacity: usize,
}

/// A cheap handle to the pipeline: submit jobs, read health, reach the store for queries.
#[derive(Clone, Debug)]
pub(crate) struct Sel {
    tx: mpsc::Sender<Job>,
    store: Store,
    shared: Arc<Shared>,
    stats: Arc<Stats>,
}

impl Sel {
    /// Starts the writer. It ends once every [`Sel`] handle is dropped and the queue is empty
    /// (or, while the database is down, when `shutdown` fires and it gives up).
    pub(crate) fn spawn(
        store: Store,
        capacity: usize,
        stats: Arc<Stats>,
        shutdown: Shutdown,
    ) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let shared = Arc::new(Shared { degraded: AtomicBool::new(false), capacity });
        let writer = Writer { store: store.clone(), shared: shared.clone(), stats: stats.clone(), shutdown };
        let task = tokio::spawn(writer.run(rx));
        (Self { tx, store, shared, stats }, task)
    }

    /// Queues `job` without waiting; gives it back (boxed: refusals are rare, queued jobs
    /// are not) if the queue is full (or the writer is gone, at shutdown).
    ///
    /// The queue gauge counts the job before it is sent: the writer may commit it (and count
    /// it out) before `try_send` returns, and a gauge counted out below zero stays at zero.
    pub(crate) fn try_submit(&self, job: Job) -> Result<(), Box<Job>> {
        self.stats.sel_queued.inc();
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job)) => {
                self.stats.sel_queued.dec();
                Err(Box::new(job))
            }
        }
    }

    /// Queues `job`, waiting up to `patience` for room (a closing room's last flush).
    pub(crate) async fn submit_within(&self, job: Job, patience: Duration) -> Result<(), Job> {
        self.stats.sel_queued.inc();
        match self.tx.send_timeout(job, patience).await {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendTimeoutError::Timeout(job) | mpsc::error::SendTimeoutError::Closed(job)) => {
                self.stats.sel_queued.dec();
                Err(job)
            }
        }
    }

    /// Waits until every job queued before this call is committed (up to `patience`); false
    /// if the queue is full or the database did not take them in time.
    pub(crate) async fn barrier(&self, patience: Duration) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let on_commit: OnCommit = Box::new(move || {
            let _ = tx.send(());
        });
        if self.try_submit(Job { batch: Batch::default(), on_commit: Some(on_commit), on_refuse: None }).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(patience, rx).await, Ok(Ok(())))
    }

    /// The store, for reads (summaries, exports) and deletes made by the API.
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// The store's health as the API reports it.
    pub(crate) fn health(&self) -> Health {
        Health {
            backend: self.store.backend_name(),
            degraded: self.shared.degraded.load(Ordering::Relaxed),
            queued: self.stats.sel_queued.get(),
            capacity: self.shared.capacity,
        }
    }
}

struct Writer {
    store: Store,
    shared: Arc<Shared>,
    stats: Arc<Stats>,
    shutdown: Shutdown,
}

impl Writer {
    async fn run(self, mut rx: mpsc::Receiver<Job>) {
        let mut group: Vec<Job> = Vec::new();
        loop {
            if group.is_empty() {
                match rx.recv().await {
                    Some(job) => group.push(job),
                    None => break,
                }
            }
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(job) => group.push(job),
                    Err(_) => break,
                }
            }
            let n = group.len();
            let written = match self.commit(&merge(&group)).await {
                Written::Committed => {
                    group.drain(..).for_each(|job| self.committed(job));
                    true
                }
                Written::Refused(e) if n == 1 => {
                    group.drain(..).for_each(|job| self.refused(job, &e));
                    true
                }
                // Some job's rows are refused: write them one by one, so only that job fails.
                Written::Refused(_) => self.one_by_one(&mut group).await,
                Written::GaveUp => false,
            };
            if !written {
                warn!(jobs = group.len(), "shutting down with SEL writes not committed");
                break;
            }
            debug!(jobs = n, "SEL group written");
        }
        rx.close();
        debug!("SEL writer ended");
    }

    /// Writes each job of `group` alone, in order, emptying it; false (with the jobs not
    /// written left in it) if shutdown came while the database was failing.
    async fn one_by_one(&self, group: &mut Vec<Job>) -> bool {
        let jobs: Vec<Job> = std::mem::take(group);
        let mut jobs = jobs.into_iter();
        while let Some(job) = jobs.next() {
            match self.commit(&job.batch).await {
                Written::Committed => self.committed(job),
                Written::Refused(e) => self.refused(job, &e),
                Written::GaveUp => {
                    group.push(job);
                    group.extend(jobs);
                    return false;
                }
            }
        }
        true
    }

    fn committed(&self, job: Job) {
        self.stats.sel_queued.dec();
        if let Some(on_commit) = job.on_commit {
            on_commit();
        }
    }

    fn refused(&self, job: Job, e: &StoreError) {
        self.stats.sel_queued.dec();
        self.stats.sel_jobs_refused.inc();
        // Counts only: the rows are children's data, and the error holds none of them.
        warn!(
            error = %e,
            participation = job.batch.participation.len(),
            reflections = job.batch.reflections.len(),
            "the SEL database refused a job's rows; the job fails alone"
        );
        if let Some(on_refuse) = job.on_refuse {
            on_refuse();
        }
    }

    /// Writes `batch` in one transaction, retrying while the database is unavailable, until
    /// it commits or the database refuses the rows themselves.
    async fn commit(&self, batch: &Batch) -> Written {
        let mut backoff = FIRST_BACKOFF;
        let mut shutdown = self.shutdown.clone();
        loop {
            match self.store.write(batch).await {
                Ok(()) => {
                    self.stats.sel_commits.inc();
                    self.stats.reflections_saved.add(batch.reflections.len() as u64);
                    self.works_again();
                    return Written::Committed;
                }
                // The database answered, so it works: the rows are the trouble.
                Err(e) if e.is_refused_data() => {
                    self.stats.sel_write_failures.inc();
                    self.works_again();
                    return Written::Refused(e);
                }
                Err(e) => self.failed(&e),
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = shutdown.wait() => {
                    // One last try, then give up: the process is ending.
                    return match self.store.write(batch).await {
                        Ok(()) => Written::Committed,
                        Err(e) if e.is_refused_data() => Written::Refused(e),
                        Err(_) => Written::GaveUp,
                    };
                }
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    fn works_again(&self) {
        if self.shared.degraded.swap(false, Ordering::Relaxed) {
            self.stats.sel_degraded.dec();
            info!("SEL database writes work again");
        }
    }

    fn failed(&self, e: &StoreError) {
        self.stats.sel_write_failures.inc();
        if !self.shared.degraded.swap(true, Ordering::Relaxed) {
            self.stats.sel_degraded.inc();
            warn!(error = %e, retryable = e.is_retryable(), "SEL database write failed; queueing and retrying");
        } else {
            debug!(error = %e, "SEL database write failed again");
        }
    }
}

/// One batch of every job's rows (their order kept: room sessions first within each, and
/// co-teachers added and removed in the order they were).
fn merge(group: &[Job]) -> Batch {
    let mut batch = Batch::default();
    for job in group {
        batch.extend_from(&job.batch);
    }
    batch
}

/// Now as Unix milliseconds (what SEL rows carry).
pub(crate) fn unix_ms_now() -> i64 {
    unix_ms(SystemTime::now())
}

/// `t` as Unix milliseconds (0 before 1970).
pub(crate) fn unix_ms(t: SystemTime) -> i64 {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

/// Deletes every tenant's SEL rows older than its retention period, now and then every
/// `interval`, until shutdown.
pub(crate) async fn purge_loop(
    store: Store,
    tenants: Arc<Tenants>,
    stats: Arc<Stats>,
    interval: Duration,
    mut shutdown: Shutdown,
) {
    loop {
        for tenant in tenants.iter() {
            let days = i64::from(tenant.retention().sel_days);
            let cutoff = unix_ms_now().saturating_sub(days * 86_400_000);
            match store.purge_before(tenant.id(), cutoff).await {
                Ok(0) => {}
                Ok(rows) => {
                    stats.sel_rows_purged.add(rows);
                    info!(tenant = tenant.id(), rows, days, "purged SEL records past retention");
                }
                Err(e) => warn!(tenant = tenant.id(), error = %e, "SEL retention purge failed; will retry"),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shutdown.wait() => return,
        }
    }
}
