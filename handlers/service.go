// Package handlers is volumed's NATS edge of the operation engine: it
// accepts commands on the volumes.cmd.* subjects (and in process for the
// REST bridge), records and queues them durably on JetStream, runs each
// job in its volume's turn through the engine (package engine, with the
// kinds of package kinds), schedules the sweep and the reconcile under
// store leases, resolves timed-out jobs, and answers the bridge's reads.
// The host work (NBD exports) is package hostwork's.
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
	"github.com/nats-io/nats.go/micro"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/hostwork"
	"github.com/volumed/volumed/internal/backoff"
	"github.com/volumed/volumed/internal/lifecycle"
	"github.com/volumed/volumed/kinds"
	"github.com/volumed/volumed/lease"
	"github.com/volumed/volumed/state"
)

// ConsumerName is the durable JetStream consumer the handlers pull jobs from.
const ConsumerName = "volumed-handlers"

// MaxJobsInFlight bounds the jobs the work queue has handed to the
// instances and not had acked (running, waiting for a running slot or for
// their turn), across the cluster: JetStream hands out no more until some
// end, so a backlog stays in the stream rather than in memory, and idle
// deliveries do not take the CPU that acceptance needs.
const MaxJobsInFlight = 1024

// QueueGroup is the NATS queue group of the command subscriptions, so
// several volumed processes share the requests.
const QueueGroup = "volumed"

// Config configures a Service.
type Config struct {
	// Conn publishes and requests for the service; required.
	Conn *nats.Conn
	// ServiceConn receives the commands on the volumes.cmd.* subjects and
	// the service discovery requests, and answers them; default Conn. Give
	// it an identity that may publish only on inboxes (bus.ServiceConn):
	// a requester chooses the reply subject.
	ServiceConn *nats.Conn
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
	Exporter hostwork.Exporter
	// AutoExport exports, read-only, every volume attached to this host
	// as soon as its device is found.
	AutoExport bool
	// StepTimeout bounds each CloudStack step, job wait included; an
	// operation whose step passes it fails. Default 5 minutes.
	StepTimeout time.Duration
	// StopGrace is how long stop_vm (a rollback's first step) waits for a
	// graceful stop before it forces one. Default kinds.DefaultStopGrace.
	StopGrace time.Duration
	// AckWait is how long a job message may go without a heartbeat before
	// JetStream redelivers it (after a crash). Default 15 s.
	AckWait time.Duration
	// MaxConcurrent bounds the operations running at once. Default 64.
	MaxConcurrent int
	// AcceptConcurrency bounds the commands accepted at once; past it a
	// command is answered 503 with Retry-After. Default
	// DefaultAcceptConcurrency.
	AcceptConcurrency int
	// CheckTimeout bounds the pre-checks of one command; past it the
	// command is accepted unchecked. Default DefaultCheckTimeout.
	CheckTimeout time.Duration
	// InventoryInterval is the background refresh period of the cached
	// zones, disk offerings and VMs. Default DefaultInventoryInterval.
	InventoryInterval time.Duration
	// Version is the version the micro service announces.
	Version string
	// RetryMin and RetryMax bound the backoff between retries of a
	// transient CloudStack failure. Defaults 200 ms and 5 s.
	RetryMin, RetryMax time.Duration
	// SettleTimeout is how long a call whose answer was lost is followed
	// up in CloudStack (the volume showing the effect) before it is sent
	// again. Default 10 s.
	SettleTimeout time.Duration
	// SyncInterval is the period of the background reconcile; default 5 m,
	// negative turns it off.
	SyncInterval time.Duration
	// Logger receives the service's logs; default slog.Default().
	Logger *slog.Logger
}

// DeviceCorrelator is the device agent side of attach, detach, the
// reconcile and the reads.
type DeviceCorrelator interface {
	engine.Devices
	kinds.DeviceSizes
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
	// AwaitStartCheck waits until the mappings vmID had at start were
	// checked against its devices, reporting whether it waited; a
	// *commands.Error SERVICE_UNAVAILABLE when ctx ends first.
	AwaitStartCheck(ctx context.Context, vmID string) (bool, error)
	// Users names who uses a mapping's device on its VM (its agent's
	// answer); none on a VM without an agent.
	Users(ctx context.Context, m commands.Mapping) ([]commands.DeviceUser, error)
	// Reconcile repairs the mappings of vmID against the volumes CloudStack
	// has attached to it (given as mappings to expect) and the devices
	// present, returning each repair in words.
	Reconcile(ctx context.Context, vmID string, attached []commands.Mapping) ([]string, error)
}

// Service accepts and executes commands, on NATS and for the REST bridge
// (it is the bridge's Commands), and answers the bridge's reads (its
// Backend).
type Service struct {
	cfg     Config
	log     *slog.Logger
	started time.Time
	// leases runs the sweep, the reconcile and a VM's exclusive attaches
	// under the store's leases; guard is what an operation holds while it
	// runs (a VM's lease), for the queue and a workflow's steps.
	leases *lease.Leaser
	guard  vmGuard

	jobs    jetstream.Stream
	consume jetstream.ConsumeContext
	sem     chan struct{}
	// createsEnded: volumes whose create is known to have ended, for the
	// turn of their jobs.
	createsEnded endedCreates

	// micro is the command service and bySubject its endpoints (also run
	// in process by Command); acceptSlots bounds the commands being
	// accepted, accepting tracks them (they run under their own timeout,
	// not the service's context, and Close waits for them).
	micro       micro.Service
	bySubject   map[string]endpoint
	acceptSlots chan struct{}
	accepting   sync.WaitGroup
	accepts     acceptStats
	inventory   *inventory

	// engine runs the operations with the kinds; host does the host work
	// (exports); mappings is the one mapping writer and release the one
	// release sequence.
	engine   *engine.Engine
	host     *hostwork.Host
	mappings *engine.MappingWriter
	release  *engine.Releaser
	rec      *reconciler

	mu sync.Mutex
	// stopping refuses new jobs once Close has begun.
	stopping bool

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	closer lifecycle.Stopper
}

// New returns a Service with defaults filled in; Start runs it.
func New(cfg Config) *Service {
	if cfg.ServiceConn == nil {
		cfg.ServiceConn = cfg.Conn
	}
	if cfg.StepTimeout <= 0 {
		cfg.StepTimeout = 5 * time.Minute
	}
	if cfg.AckWait <= 0 {
		cfg.AckWait = 15 * time.Second
	}
	if cfg.MaxConcurrent <= 0 {
		cfg.MaxConcurrent = 64
	}
	if cfg.AcceptConcurrency <= 0 {
		cfg.AcceptConcurrency = DefaultAcceptConcurrency
	}
	if cfg.CheckTimeout <= 0 {
		cfg.CheckTimeout = DefaultCheckTimeout
	}
	if cfg.InventoryInterval <= 0 {
		cfg.InventoryInterval = DefaultInventoryInterval
	}
	if cfg.Version == "" {
		cfg.Version = "0.0.0"
	}
	if cfg.RetryMin <= 0 {
		cfg.RetryMin = 200 * time.Millisecond
	}
	if cfg.RetryMax <= 0 {
		cfg.RetryMax = 5 * time.Second
	}
	if cfg.SettleTimeout <= 0 {
		cfg.SettleTimeout = 10 * time.Second
	}
	if cfg.StopGrace <= 0 {
		cfg.StopGrace = kinds.DefaultStopGrace
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
	s := &Service{
		cfg: cfg,
		log: cfg.Logger.With("component", "handlers"),
		sem: make(chan struct{}, cfg.MaxConcurrent),
	}
	s.leases = &lease.Leaser{Store: cfg.Store, Holder: lease.Holder(), Log: s.log}
	s.guard = vmGuard{devices: cfg.Devices, leases: s.leases}
	s.acceptSlots = make(chan struct{}, cfg.AcceptConcurrency)
	s.inventory = newInventory(cfg.CloudStack, s.log)
	s.host = hostwork.New(hostwork.Config{Conn: cfg.Conn, Store: cfg.Store, VMID: cfg.VMID, Exporter: cfg.Exporter,
		AutoExport: cfg.AutoExport, QueueGroup: QueueGroup, Logger: s.log})
	s.mappings = engine.NewMappingWriter(cfg.Store, nil, s.log)
	var devices engine.Devices
	var sizes kinds.DeviceSizes
	if cfg.Devices != nil {
		devices, sizes = cfg.Devices, cfg.Devices
	}
	s.release = &engine.Releaser{Mappings: s.mappings, Exports: s.host, Devices: devices,
		InUse: inUse{devices: cfg.Devices, host: s.host}, Wait: cfg.StepTimeout, Log: s.log}
	s.engine = engine.New(engine.Config{Operations: cfg.Store, Publisher: s, Guard: s.guard, Jobs: cfg.CloudStack, Logger: s.log,
		Timing: engine.Timing{StepTimeout: cfg.StepTimeout, SettleTimeout: cfg.SettleTimeout,
			Retry: backoff.Policy{Min: cfg.RetryMin, Max: cfg.RetryMax}}},
		kinds.All(kinds.Deps{CloudStack: cfg.CloudStack, Operations: cfg.Store, Mappings: s.mappings, Release: s.release,
			Devices: devices, Sizes: sizes, Exports: s.host, Catalog: catalog{s}, StopGrace: cfg.StopGrace, Log: s.log})...)
	s.rec = &reconciler{cfg: cfg, log: s.log, mappings: s.mappings, release: s.release, pub: s, kind: s.engine.Kind}
	s.bySubject = map[string]endpoint{}
	for _, ep := range s.endpoints() {
		s.bySubject[ep.subject] = ep
	}
	return s
}

// inUse is the release's UseChecker: the device agent of the volume's VM
// and the NBD server serving its export.
type inUse struct {
	devices DeviceCorrelator
	host    *hostwork.Host
}

var _ engine.UseChecker = inUse{}

// Users lists the device's users, then the export's clients.
func (u inUse) Users(ctx context.Context, m commands.Mapping) ([]commands.DeviceUser, error) {
	var users []commands.DeviceUser
	if u.devices != nil && m.VMID != "" {
		var err error
		if users, err = u.devices.Users(ctx, m); err != nil {
			return nil, err
		}
	}
	clients, err := u.host.ExportUsers(ctx, m.VolumeID)
	return append(users, clients...), err
}

// Start subscribes to the command subjects, starts pulling jobs, and
// queues again unfinished operations whose job is missing (now, and every
// few ack-waits).
func (s *Service) Start(ctx context.Context) error {
	if s.cfg.Conn == nil || s.cfg.JetStream == nil || s.cfg.Store == nil || s.cfg.CloudStack == nil {
		return errors.New("handlers: Conn, JetStream, Store and CloudStack are required")
	}
	s.started = time.Now()
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.inventory.run(s.ctx, s.cfg.InventoryInterval, &s.wg)
	}()
	if err := s.host.Start(ctx); err != nil {
		s.stop()
		return err
	}
	// The consumer first: a command retried with its key asks the work
	// queue (s.jobs) whether its job is there.
	if err := s.startConsumer(ctx); err != nil {
		s.stop()
		return err
	}
	if err := s.startCommands(); err != nil {
		s.stop()
		return err
	}
	// The first sweep does not hold the start: its store or queue not
	// answering yet (a cluster forming, a member catching up) would fail
	// it, and the periodic sweep does it again.
	if _, err := s.sweep(ctx); err != nil {
		s.log.Warn("sweep at start failed; the periodic sweep does it again", "err", err)
	}
	// A sweep every few ack-waits: a job lost with its stream is queued
	// again soon, without listing the unfinished operations too often.
	s.wg.Add(1)
	go every(s.ctx, &s.wg, 4*s.cfg.AckWait, func() {
		if _, err := s.sweep(s.ctx); err != nil {
			s.log.Warn("periodic sweep failed", "err", err)
		}
	})
	if s.cfg.SyncInterval > 0 {
		s.wg.Add(1)
		go every(s.ctx, &s.wg, s.cfg.SyncInterval, func() {
			err := s.leases.Leased(s.ctx, engine.LeaseReconcile, false, func(ctx context.Context) error {
				_, err := s.reconcile(ctx)
				return err
			})
			if err != nil && !errors.Is(err, state.ErrLeaseHeld) {
				s.log.Warn("periodic reconcile failed", "err", err)
			}
		})
	}
	s.log.Info("handlers started", "vm_id", s.cfg.VMID, "step_timeout", s.cfg.StepTimeout,
		"store", s.cfg.StoreName, "device_correlation", s.cfg.Devices != nil,
		"nbd_exports", s.cfg.Exporter != nil, "auto_export", s.cfg.AutoExport)
	return nil
}

// Close stops taking commands and jobs, cancels running steps and waits for
// them. Unfinished operations stay recorded and are resumed by the next
// Start. It waits within ctx; closing twice is safe.
func (s *Service) Close(ctx context.Context) error {
	if err := s.closer.Close(ctx, s.stop); err != nil {
		return fmt.Errorf("handlers: close: %w", err)
	}
	return nil
}

func (s *Service) stop() {
	s.mu.Lock()
	s.stopping = true
	s.mu.Unlock()
	if s.micro != nil {
		_ = s.micro.Stop()
	}
	// Commands being accepted end on their own, within their timeout:
	// cut short, an answer could contradict what was recorded.
	s.accepting.Wait()
	s.host.Stop()
	if s.consume != nil {
		s.consume.Stop()
	}
	if s.cancel != nil {
		s.cancel()
	}
	s.wg.Wait()
}

// every runs fn every interval until ctx ends, and then marks wg done.
func every(ctx context.Context, wg *sync.WaitGroup, interval time.Duration, fn func()) {
	defer wg.Done()
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			fn()
		}
	}
}
