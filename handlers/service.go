// Package handlers executes volumed's commands: it accepts them on the
// volumes.cmd.* subjects, records and queues them durably, runs each one as
// CloudStack steps that first ask whether the step is already done, keeps
// mappings and NBD exports, publishes every state change on volumes.ops.<id>, and answers
// the reads of the REST bridge.
package handlers

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/handlers/csapi"
	"github.com/volumed/volumed/state"
)

// ConsumerName is the durable JetStream consumer the handlers pull jobs from.
const ConsumerName = "volumed-handlers"

// QueueGroup is the NATS queue group of the command subscriptions, so
// several volumed processes share the requests.
const QueueGroup = "volumed"

// Config configures a Service.
type Config struct {
	// Conn receives the commands on the volumes.cmd.* subjects; required.
	Conn *nats.Conn
	// JetStream queues the jobs and publishes operation updates; required.
	JetStream jetstream.JetStream
	// Store holds operations, mappings and exports; required.
	Store state.Store
	// CloudStack is the CloudStack API the steps call; required.
	CloudStack csapi.API
	// StoreName names the state backend in health ("redis", "embedded").
	StoreName string
	// VMID is the CloudStack VM this host is.
	VMID string
	// Devices correlates attached volumes with local block devices; nil
	// until a device agent runs (attaches then complete on CloudStack's
	// answer).
	Devices DeviceCorrelator
	// Exporter serves this host's export records over NBD; nil when the
	// NBD server is off (export commands and reads then answer 503).
	Exporter Exporter
	// AutoExport exports, read-only, every volume attached to this host
	// as soon as its device is found.
	AutoExport bool
	// StepTimeout bounds each CloudStack step, job wait included; an
	// operation whose step passes it fails. Default 5 minutes.
	StepTimeout time.Duration
	// AckWait is how long a job message may go without a heartbeat before
	// JetStream redelivers it (after a crash). Default 15 s.
	AckWait time.Duration
	// MaxConcurrent bounds the operations running at once. Default 64.
	MaxConcurrent int
	// RetryMin and RetryMax bound the backoff between retries of a
	// transient CloudStack failure. Defaults 200 ms and 5 s.
	RetryMin, RetryMax time.Duration
	// SyncInterval is the period of the background reconcile; default 5 m,
	// negative turns it off.
	SyncInterval time.Duration
	// Logger receives the service's logs; default slog.Default().
	Logger *slog.Logger
}

// DeviceCorrelator is the device agent side of attach and detach.
type DeviceCorrelator interface {
	// HasAgent reports whether vmID has a device agent whose devices can
	// be correlated.
	HasAgent(ctx context.Context, vmID string) bool
	// Attached waits for the device of a volume just attached; want holds
	// the volume, VM, size and CloudStack device id. It returns the mapping
	// to record (device path, linux state, size, persistent name); after
	// its timeout it fails, returning a mapping with linux_state missing to
	// record all the same.
	Attached(ctx context.Context, want commands.Mapping, since time.Time) (commands.Mapping, error)
	// Detached releases what the volume had on its VM (persistent name)
	// once its device is gone or after a timeout.
	Detached(ctx context.Context, m commands.Mapping) error
	// Status reports the monitor's health, device count, scan interval and
	// the device events processed.
	Status() (health string, deviceCount int, scanInterval time.Duration, events int64)
	// AgentVMs lists the VMs whose agents have been heard from.
	AgentVMs() []string
	// NoIdentity reports whether vmID's disks show no volume identity, so
	// that its attaches must run one at a time to be told apart.
	NoIdentity(vmID string) bool
	// Controller names the bus of a local device path ("" if unknown).
	Controller(devicePath string) string
	// Reconcile repairs the mappings of vmID against the volumes CloudStack
	// has attached to it (given as mappings to expect) and the devices
	// present, returning each repair in words.
	Reconcile(ctx context.Context, vmID string, attached []commands.Mapping) ([]string, error)
}

// Service accepts and executes commands, and answers the REST bridge's
// reads (it is the bridge's Backend).
type Service struct {
	cfg     Config
	log     *slog.Logger
	started time.Time

	subs    []*nats.Subscription
	consume jetstream.ConsumeContext
	keys    *serializer
	sem     chan struct{}

	mu sync.Mutex
	// inflight maps each operation running here to the stream sequence
	// of the job message it holds.
	inflight map[string]uint64
	// recovering holds the volumes with a requeued unfinished operation,
	// until no older one is left on them.
	recovering map[string]bool
	// stopping refuses new jobs once Close has begun.
	stopping bool
	// syncMu runs one reconcile at a time.
	syncMu sync.Mutex

	// exportMu serializes the syncs of the served exports.
	exportMu sync.Mutex

	ctx       context.Context
	cancel    context.CancelFunc
	wg        sync.WaitGroup
	closeOnce sync.Once
}

// New returns a Service with defaults filled in; Start runs it.
func New(cfg Config) *Service {
	if cfg.StepTimeout <= 0 {
		cfg.StepTimeout = 5 * time.Minute
	}
	if cfg.AckWait <= 0 {
		cfg.AckWait = 15 * time.Second
	}
	if cfg.MaxConcurrent <= 0 {
		cfg.MaxConcurrent = 64
	}
	if cfg.RetryMin <= 0 {
		cfg.RetryMin = 200 * time.Millisecond
	}
	if cfg.RetryMax <= 0 {
		cfg.RetryMax = 5 * time.Second
	}
	if cfg.SyncInterval == 0 {
		cfg.SyncInterval = 5 * time.Minute
	}
	if cfg.StoreName == "" {
		cfg.StoreName = "embedded"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Service{
		cfg:        cfg,
		log:        cfg.Logger.With("component", "handlers"),
		keys:       newSerializer(),
		sem:        make(chan struct{}, cfg.MaxConcurrent),
		inflight:   map[string]uint64{},
		recovering: map[string]bool{},
	}
}

// Start subscribes to the command subjects, re-queues operations a crash
// left unfinished, and starts pulling jobs.
func (s *Service) Start(ctx context.Context) error {
	if s.cfg.Conn == nil || s.cfg.JetStream == nil || s.cfg.Store == nil || s.cfg.CloudStack == nil {
		return errors.New("handlers: Conn, JetStream, Store and CloudStack are required")
	}
	s.started = time.Now()
	s.ctx, s.cancel = context.WithCancel(context.Background())
	for subject, handle := range s.commandHandlers() {
		sub, err := s.cfg.Conn.QueueSubscribe(subject, QueueGroup, bus.Published(handle))
		if err != nil {
			s.stop()
			return fmt.Errorf("handlers: subscribe %s: %w", subject, err)
		}
		s.subs = append(s.subs, sub)
	}
	if changes, err := s.reconcileExports(ctx); err != nil {
		s.log.Warn("exports not restored", "error", err)
	} else if len(changes) > 0 {
		s.log.Info("exports restored from state", "changes", changes)
	}
	if s.cfg.Exporter != nil {
		sub, err := s.cfg.Conn.Subscribe(commands.SubjectMappingsPrefix+">", bus.Published(s.onMapping))
		if err != nil {
			s.stop()
			return fmt.Errorf("handlers: subscribe mappings: %w", err)
		}
		s.subs = append(s.subs, sub)
	}
	if err := s.requeueUnfinished(ctx); err != nil {
		s.stop()
		return err
	}
	if err := s.startConsumer(ctx); err != nil {
		s.stop()
		return err
	}
	if s.cfg.SyncInterval > 0 {
		s.wg.Add(1)
		go s.syncLoop()
	}
	s.log.Info("handlers started", "vm_id", s.cfg.VMID, "step_timeout", s.cfg.StepTimeout,
		"store", s.cfg.StoreName, "device_correlation", s.cfg.Devices != nil,
		"nbd_exports", s.cfg.Exporter != nil, "auto_export", s.cfg.AutoExport)
	return nil
}

// Close stops taking commands and jobs, cancels running steps and waits for
// them. Unfinished operations stay recorded and are resumed by the next
// Start. Closing twice is safe.
func (s *Service) Close(ctx context.Context) error {
	s.closeOnce.Do(s.stop)
	return nil
}

func (s *Service) stop() {
	s.mu.Lock()
	s.stopping = true
	s.mu.Unlock()
	for _, sub := range s.subs {
		_ = sub.Unsubscribe()
	}
	if s.consume != nil {
		s.consume.Stop()
	}
	if s.cancel != nil {
		s.cancel()
	}
	s.wg.Wait()
}

func (s *Service) syncLoop() {
	defer s.wg.Done()
	t := time.NewTicker(s.cfg.SyncInterval)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
			if _, err := s.Reconcile(s.ctx); err != nil {
				s.log.Warn("periodic reconcile failed", "error", err)
			}
		}
	}
}
