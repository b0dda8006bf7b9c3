// Package metrics is volumed's Prometheus exposition (GET /metrics, outside
// /api/v1). Most values are read at scrape time from what the components
// already keep (the store, the JetStream consumers, the NBD server's
// counters) or counted from the operation events on the bus; the two
// measurements nothing else keeps, CloudStack call latency and correlation
// latency, are one-line hooks (package metrics/hooks) whose vectors every
// Registry registers.
package metrics

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/metrics/hooks"
	"github.com/volumed/volumed/nbd"
)

// Namespace prefixes every metric name.
const Namespace = hooks.Namespace

// scrapeTimeout bounds the reads one scrape makes.
const scrapeTimeout = 5 * time.Second

// Counters is what the daemon counts itself (handlers.Service).
type Counters interface {
	// Metrics is GET /api/v1/metrics; only Details.DeviceEventsProcessed
	// is exported here.
	Metrics(ctx context.Context) (commands.Metrics, error)
}

// NBDStats is the NBD server's counters (*nbd.Server).
type NBDStats interface {
	Stats() nbd.Stats
}

var _ NBDStats = (*nbd.Server)(nil)

// Config configures an Exporter.
type Config struct {
	// Conn carries the operation events (volumes.ops.>); required.
	Conn *nats.Conn
	// JetStream reads the job queue's consumers; required.
	JetStream jetstream.JetStream
	// Counters gives the device events; required.
	Counters Counters
	// NBD gives the NBD counters; nil when the NBD server is off.
	NBD NBDStats
	// Logger is the parent logger; default slog.Default().
	Logger *slog.Logger
}

// Exporter serves the Prometheus exposition. Create it with New, then
// Start it to count operation events.
type Exporter struct {
	cfg Config
	log *slog.Logger
	reg *prometheus.Registry

	ops      *prometheus.CounterVec
	duration *prometheus.HistogramVec
	steps    *prometheus.CounterVec
	failures *prometheus.CounterVec

	mu   sync.Mutex
	sub  *nats.Subscription
	done bool
}

// New checks cfg and registers every collector.
func New(cfg Config) (*Exporter, error) {
	if cfg.Conn == nil || cfg.JetStream == nil || cfg.Counters == nil {
		return nil, errors.New("metrics: Conn, JetStream and Counters are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	e := &Exporter{cfg: cfg, log: cfg.Logger.With("component", "metrics"), reg: prometheus.NewRegistry(),
		ops: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: Namespace, Name: "operations_total",
			Help: "Operations seen reaching a status on the bus, by type and status: pending when accepted, then their terminal status.",
		}, []string{"type", "status"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: Namespace, Name: "operation_duration_seconds",
			Help:    "Time from acceptance to the terminal status, by operation type.",
			Buckets: hooks.WaitBuckets,
		}, []string{"type"}),
		steps: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: Namespace, Name: "workflow_steps_total",
			Help: "Steps of the failovers and rollbacks that ended, by workflow type, step (snapshot, detach, attach, export, start_vm, stop_vm, revert, delete_snapshot), phase (forward, or undo for a compensating step) and final status (done, failed, undone, skipped, pending).",
		}, []string{"type", "step", "phase", "status"}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: Namespace, Name: "workflow_failures_total",
			Help: "Failovers and rollbacks that failed, by type and whether what they did was undone (compensated true); compensated false left volumes or snapshots that need a person.",
		}, []string{"type", "compensated"}),
	}
	for _, t := range commands.OpTypes {
		for _, s := range []commands.OpStatus{commands.StatusPending, commands.StatusCompleted, commands.StatusFailed, commands.StatusCancelled} {
			e.ops.WithLabelValues(string(t), string(s))
		}
	}
	for _, t := range workflowTypes {
		for _, c := range []string{"true", "false"} {
			e.failures.WithLabelValues(string(t), c)
		}
	}
	cs := append([]prometheus.Collector{e.ops, e.duration, e.steps, e.failures, scrape{e},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{})}, hooks.Collectors()...)
	for _, c := range cs {
		if err := e.reg.Register(c); err != nil {
			return nil, fmt.Errorf("metrics: register: %w", err)
		}
	}
	return e, nil
}

// Handler serves the text exposition.
func (e *Exporter) Handler() http.Handler {
	return promhttp.HandlerFor(e.reg, promhttp.HandlerOpts{ErrorLog: slog.NewLogLogger(e.log.Handler(), slog.LevelWarn)})
}

// Registry is the registry the exporter serves, for tests and embedding.
func (e *Exporter) Registry() *prometheus.Registry { return e.reg }

// Start subscribes to the operation events, as published: a copy a
// JetStream consumer delivers onto volumes.ops.> is not counted again.
func (e *Exporter) Start(ctx context.Context) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.sub != nil || e.done {
		return errors.New("metrics: already started or closed")
	}
	sub, err := e.cfg.Conn.Subscribe(commands.SubjectOpsPrefix+">", bus.Published(e.event))
	if err != nil {
		return fmt.Errorf("metrics: subscribe: %w", err)
	}
	fctx, cancel := context.WithTimeout(ctx, scrapeTimeout)
	defer cancel()
	if err := e.cfg.Conn.FlushWithContext(fctx); err != nil {
		_ = sub.Unsubscribe()
		return fmt.Errorf("metrics: subscribe: %w", err)
	}
	e.sub = sub
	return nil
}

// Close stops counting events. Closing twice is safe.
func (e *Exporter) Close(context.Context) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.done = true
	if e.sub == nil {
		return nil
	}
	err := e.sub.Unsubscribe()
	e.sub = nil
	if err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
		return fmt.Errorf("metrics: unsubscribe: %w", err)
	}
	return nil
}

// counted is what the counts read of an operation event: its JSON is
// decoded once, into these fields only (an event is the whole operation,
// request, response and details included).
type counted struct {
	Type        commands.OpType            `json:"type"`
	Status      commands.OpStatus          `json:"status"`
	Details     map[string]json.RawMessage `json:"details"`
	Workflow    *countedSteps              `json:"workflow"`
	Response    *countedSteps              `json:"response"`
	CreatedAt   time.Time                  `json:"created_at"`
	CompletedAt *time.Time                 `json:"completed_at"`
}

// countedSteps is the steps of a workflow or of its response.
type countedSteps struct {
	Steps []commands.WorkflowStep `json:"steps"`
}

// resolved is commands.Operation.Resolved: the reconcile's record of what
// became of a timed-out job.
func (o *counted) resolved() bool {
	_, ok := o.Details[commands.DetailResolvedAt]
	return ok
}

// settled is the reconcile's record that nothing a failed workflow left
// remains (commands.DetailSettledAt).
func (o *counted) settled() bool {
	_, ok := o.Details[commands.DetailSettledAt]
	return ok
}

// event counts one operation event: an acceptance (pending) or an end.
func (e *Exporter) event(msg *nats.Msg) {
	var op counted
	if err := json.Unmarshal(msg.Data, &op); err != nil || op.Type == "" {
		e.log.Debug("undecodable operation event", "subject", msg.Subject, "err", err)
		return
	}
	switch {
	case op.Status == commands.StatusPending:
		e.ops.WithLabelValues(string(op.Type), string(op.Status)).Inc()
	case op.resolved(), op.settled():
		// The reconcile's record of a timed-out job, or of a failed
		// workflow whose leftovers were put back: the operation had
		// failed, and was counted, already.
	case op.Status.Terminal():
		// The end is counted last: a scrape that counts it has its
		// duration and steps.
		if d := commands.Took(op.CreatedAt, op.CompletedAt); d > 0 {
			e.duration.WithLabelValues(string(op.Type)).Observe(d.Seconds())
		}
		if slices.Contains(workflowTypes, op.Type) {
			e.workflowEnded(op)
		}
		e.ops.WithLabelValues(string(op.Type), string(op.Status)).Inc()
	}
}

// workflowTypes are the operation types that run steps as child
// operations (each child also counts under its own type).
var workflowTypes = []commands.OpType{commands.OpFailover, commands.OpRollback}

// workflowEnded counts the steps of a failover or rollback that ended, as
// its final record has them, and its failure.
func (e *Exporter) workflowEnded(op counted) {
	var steps []commands.WorkflowStep
	switch {
	case op.Workflow != nil:
		steps = op.Workflow.Steps
	case op.Response != nil:
		steps = op.Response.Steps
	}
	for _, s := range steps {
		phase := "forward"
		if s.Undoes != nil {
			phase = "undo"
		}
		e.steps.WithLabelValues(string(op.Type), s.Name, phase, s.Status).Inc()
	}
	var compensated any
	if raw, ok := op.Details[commands.DetailCompensated]; ok && op.Status == commands.StatusFailed &&
		json.Unmarshal(raw, &compensated) == nil {
		if c, ok := compensated.(bool); ok {
			e.failures.WithLabelValues(string(op.Type), strconv.FormatBool(c)).Inc()
		}
	}
}

// scrape is the collector of what is read at scrape time.
type scrape struct{ e *Exporter }

var (
	queueDepthDesc = prometheus.NewDesc(Namespace+"_queue_depth",
		"Jobs queued and not yet delivered to a handler (JetStream consumers of "+bus.StreamJobs+").", nil, nil)
	queueInFlightDesc = prometheus.NewDesc(Namespace+"_queue_in_flight",
		"Jobs delivered to a handler and not yet acknowledged.", nil, nil)
	queueRedeliveredDesc = prometheus.NewDesc(Namespace+"_queue_redelivered",
		"Jobs delivered more than once and not yet acknowledged (a handler crashed or lost them).", nil, nil)
	deviceEventsDesc = prometheus.NewDesc(Namespace+"_device_events_total",
		"Device events (add, remove, change) the correlator received since this process started.", nil, nil)
	nbdConnsDesc = prometheus.NewDesc(Namespace+"_nbd_connections",
		"NBD connections open now.", nil, nil)
	nbdConnsTotalDesc = prometheus.NewDesc(Namespace+"_nbd_connections_total",
		"NBD connections accepted since this process started.", nil, nil)
	nbdBytesDesc = prometheus.NewDesc(Namespace+"_nbd_bytes_total",
		"Payload bytes moved through the NBD exports since this process started, by direction (read, write).",
		[]string{"direction"}, nil)
	scrapeErrorsDesc = prometheus.NewDesc(Namespace+"_scrape_errors",
		"Sources this scrape could not read, by source (queue, counters).", []string{"source"}, nil)
)

// Describe implements prometheus.Collector.
func (s scrape) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{queueDepthDesc, queueInFlightDesc, queueRedeliveredDesc, deviceEventsDesc,
		nbdConnsDesc, nbdConnsTotalDesc, nbdBytesDesc, scrapeErrorsDesc} {
		ch <- d
	}
}

// Collect implements prometheus.Collector: it reads the queue's
// consumers, the daemon's counters and the NBD server's.
func (s scrape) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), scrapeTimeout)
	defer cancel()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	queueErr, countersErr := 0.0, 0.0
	if depth, inFlight, redelivered, err := s.e.queue(ctx); err != nil {
		s.e.log.Warn("read the job queue", "err", err)
		queueErr = 1
	} else {
		gauge(queueDepthDesc, float64(depth))
		gauge(queueInFlightDesc, float64(inFlight))
		gauge(queueRedeliveredDesc, float64(redelivered))
	}
	if m, err := s.e.cfg.Counters.Metrics(ctx); err != nil {
		s.e.log.Warn("read the daemon's counters", "err", err)
		countersErr = 1
	} else {
		counter(deviceEventsDesc, float64(m.Details.DeviceEventsProcessed))
	}
	if s.e.cfg.NBD != nil {
		st := s.e.cfg.NBD.Stats()
		gauge(nbdConnsDesc, float64(st.Connections))
		counter(nbdConnsTotalDesc, float64(st.ConnectionsTotal))
		counter(nbdBytesDesc, float64(st.BytesRead), "read")
		counter(nbdBytesDesc, float64(st.BytesWritten), "write")
	}
	gauge(scrapeErrorsDesc, queueErr, "queue")
	gauge(scrapeErrorsDesc, countersErr, "counters")
}

// queue sums the job stream's consumers: jobs not yet delivered, delivered
// and not acknowledged, and redelivered and not acknowledged.
func (e *Exporter) queue(ctx context.Context) (depth, inFlight, redelivered uint64, err error) {
	stream, err := e.cfg.JetStream.Stream(ctx, bus.StreamJobs)
	if err != nil {
		return 0, 0, 0, err
	}
	lister := stream.ListConsumers(ctx)
	for info := range lister.Info() {
		depth += info.NumPending
		inFlight += uint64(max(info.NumAckPending, 0))
		redelivered += uint64(max(info.NumRedelivered, 0))
	}
	return depth, inFlight, redelivered, lister.Err()
}
