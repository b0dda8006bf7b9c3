// Package cloudsim simulates the part of the Apache CloudStack API that
// volumed uses (volumes, VMs, zones, disk offerings, async jobs) closely
// enough that the unmodified cloudstack-go client cannot tell it from
// CloudStack. Volumes attached to the appliance VM appear on this host as
// real loop devices; state survives a restart; faults can be injected.
package cloudsim

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// LocalDeviceMode says whether attaching to a VM with local devices makes
// loop devices on this host.
type LocalDeviceMode string

// Local device modes.
const (
	// LocalDevicesAuto makes loop devices when root with /dev/loop-control,
	// and otherwise runs without them (saying so at start).
	LocalDevicesAuto LocalDeviceMode = "auto"
	// LocalDevicesOff never makes loop devices.
	LocalDevicesOff LocalDeviceMode = "off"
)

// Defaults of Config.
const (
	DefaultListen      = "127.0.0.1:8080"
	DefaultJobDuration = 300 * time.Millisecond
	// APIPath is where the CloudStack API is served.
	APIPath = "/client/api"
	// ControlPath is the prefix of the fault, stats and data endpoints.
	ControlPath = "/_sim"
)

// Config configures a simulator; zero fields take defaults.
type Config struct {
	// Listen is the TCP address (DefaultListen; "127.0.0.1:0" for any port).
	Listen string
	// APIKey and SecretKey are the only accepted credentials
	// (DefaultAPIKey, DefaultSecretKey).
	APIKey, SecretKey string
	// StateDir holds state.json and the backing files; "" makes a
	// temporary directory that Teardown removes.
	StateDir string
	// Inventory is the fixed cloud; nil means DefaultInventory().
	Inventory *Inventory
	// LocalDevices is LocalDevicesAuto (default) or LocalDevicesOff.
	LocalDevices LocalDeviceMode
	// AnonymousBackingFiles gives backing files random names that carry
	// no volume identity.
	AnonymousBackingFiles bool
	// JobDuration is how long an async job runs (DefaultJobDuration);
	// JobJitter adds a random 0..JobJitter.
	JobDuration, JobJitter time.Duration
	// Seed seeds fault and jitter decisions, so a run can be reproduced.
	Seed uint64
	// Faults are the initial injected faults.
	Faults Faults
	// Logger is the parent logger (default: discard).
	Logger *slog.Logger
}

// LocalDevice is a volume's device on this host.
type LocalDevice struct {
	// Path is the loop device, e.g. /dev/loop12.
	Path string
	// BackingFile is the sparse file behind it.
	BackingFile string
}

// Sim is a running CloudStack simulator.
type Sim struct {
	cfg    Config
	inv    *Inventory
	log    *slog.Logger
	loops  *loops // nil without local devices
	tmpDir bool

	mu      sync.Mutex // guards st, calls, rng
	st      *persisted
	calls   map[string]int64
	rng     *rand.Rand
	faultMu sync.RWMutex
	faults  Faults

	// execMu serialises everything that changes volumes, VMs and devices.
	execMu sync.Mutex

	srv      *http.Server
	ln       net.Listener
	ctx      context.Context
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	closeMu  sync.Mutex
	started  bool
	closed   bool
	closeErr error
}

// ErrClosed is returned by Start after Close.
var ErrClosed = errors.New("cloudsim: closed")

// New validates cfg and loads or initialises the state; Start serves it.
func New(cfg Config) (*Sim, error) {
	if cfg.Listen == "" {
		cfg.Listen = DefaultListen
	}
	if cfg.APIKey == "" {
		cfg.APIKey = DefaultAPIKey
	}
	if cfg.SecretKey == "" {
		cfg.SecretKey = DefaultSecretKey
	}
	if cfg.JobDuration == 0 {
		cfg.JobDuration = DefaultJobDuration
	}
	if cfg.JobDuration < 0 || cfg.JobJitter < 0 {
		return nil, fmt.Errorf("cloudsim: negative job duration or jitter")
	}
	if cfg.LocalDevices == "" {
		cfg.LocalDevices = LocalDevicesAuto
	}
	if cfg.LocalDevices != LocalDevicesAuto && cfg.LocalDevices != LocalDevicesOff {
		return nil, fmt.Errorf("cloudsim: local devices mode %q is not auto or off", cfg.LocalDevices)
	}
	if err := cfg.Faults.Validate(); err != nil {
		return nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	inv := cfg.Inventory
	if inv == nil {
		inv = DefaultInventory()
	}
	if err := inv.Validate(); err != nil {
		return nil, err
	}
	s := &Sim{
		cfg:    cfg,
		inv:    inv,
		log:    cfg.Logger.With("component", "cloudsim"),
		calls:  map[string]int64{},
		rng:    rand.New(rand.NewPCG(cfg.Seed, cfg.Seed^0x9e3779b97f4a7c15)),
		faults: cfg.Faults,
	}
	if cfg.StateDir == "" {
		d, err := os.MkdirTemp("", "cloudsim-*")
		if err != nil {
			return nil, fmt.Errorf("cloudsim: state dir: %w", err)
		}
		s.cfg.StateDir, s.tmpDir = d, true
	}
	dir, err := filepath.Abs(s.cfg.StateDir)
	if err != nil {
		return nil, fmt.Errorf("cloudsim: state dir: %w", err)
	}
	s.cfg.StateDir = dir
	if err := os.MkdirAll(filepath.Join(dir, disksDir), 0o755); err != nil {
		return nil, fmt.Errorf("cloudsim: state dir: %w", err)
	}
	st, err := loadPersisted(dir)
	switch {
	case errors.Is(err, os.ErrNotExist):
		st = newPersisted(inv, time.Now().UTC())
		if err := st.save(dir); err != nil {
			return nil, fmt.Errorf("cloudsim: %w", err)
		}
	case err != nil:
		return nil, fmt.Errorf("cloudsim: %w", err)
	}
	s.st = st
	if cfg.LocalDevices == LocalDevicesAuto {
		l, err := newLoops(filepath.Join(dir, disksDir))
		if err != nil {
			s.log.Warn("running without local devices", "reason", err.Error())
		} else {
			s.loops = l
		}
	} else {
		s.log.Info("running without local devices", "reason", "disabled by config")
	}
	return s, nil
}

// Start listens, reconciles loop devices with the state and resumes
// pending jobs. It returns once the API answers.
func (s *Sim) Start(ctx context.Context) error {
	s.closeMu.Lock()
	defer s.closeMu.Unlock()
	if s.closed {
		return ErrClosed
	}
	if s.started {
		return nil
	}
	if err := s.reconcileDevices(ctx); err != nil {
		return fmt.Errorf("cloudsim: reconcile devices: %w", err)
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", s.cfg.Listen)
	if err != nil {
		return fmt.Errorf("cloudsim: listen: %w", err)
	}
	s.ln = ln
	s.ctx, s.cancel = context.WithCancel(context.Background())
	mux := http.NewServeMux()
	mux.HandleFunc(APIPath, s.serveAPI)
	mux.HandleFunc(ControlPath+"/faults", s.serveFaults)
	mux.HandleFunc(ControlPath+"/stats", s.serveStats)
	mux.HandleFunc(ControlPath+"/volumes/{id}/data", s.serveData)
	s.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second,
		BaseContext: func(net.Listener) context.Context { return s.ctx }}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("serve", "err", err.Error())
		}
	}()
	s.mu.Lock()
	for _, j := range s.st.Jobs {
		if j.Status == jobPending && !j.Hang && !j.Held {
			s.schedule(j.ID, j.Due)
		}
	}
	s.release(s.Faults())
	s.mu.Unlock()
	s.started = true
	s.log.Info("started", "url", s.URL(), "statedir", s.cfg.StateDir, "localdevices", s.loops != nil)
	return nil
}

// URL is the API endpoint, http://host:port/client/api.
func (s *Sim) URL() string { return "http://" + s.addr() + APIPath }

// ControlURL is the control endpoint prefix, http://host:port/_sim.
func (s *Sim) ControlURL() string { return "http://" + s.addr() + ControlPath }

func (s *Sim) addr() string {
	if s.ln != nil {
		return s.ln.Addr().String()
	}
	return s.cfg.Listen
}

// APIKey is the API key the simulator accepts.
func (s *Sim) APIKey() string { return s.cfg.APIKey }

// SecretKey is the secret key the simulator verifies signatures with.
func (s *Sim) SecretKey() string { return s.cfg.SecretKey }

// StateDir is the absolute state directory.
func (s *Sim) StateDir() string { return s.cfg.StateDir }

// LocalDevicesEnabled reports whether attaches make loop devices.
func (s *Sim) LocalDevicesEnabled() bool { return s.loops != nil }

// Close stops serving and waits for running jobs; pending jobs stay in the
// state and finish after a restart. Loop devices of attached volumes are
// kept. Closing twice is safe.
func (s *Sim) Close(ctx context.Context) error {
	s.closeMu.Lock()
	defer s.closeMu.Unlock()
	if s.closed {
		return s.closeErr
	}
	s.closed = true
	if !s.started {
		return nil
	}
	s.mu.Lock() // schedule checks s.ctx under s.mu before wg.Add
	s.cancel()
	s.mu.Unlock()
	s.closeErr = s.srv.Shutdown(ctx)
	if errors.Is(s.closeErr, context.DeadlineExceeded) || errors.Is(s.closeErr, context.Canceled) {
		s.closeErr = errors.Join(s.closeErr, s.srv.Close())
	}
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		s.closeErr = errors.Join(s.closeErr, ctx.Err())
	}
	if s.closeErr != nil {
		s.closeErr = fmt.Errorf("cloudsim: close: %w", s.closeErr)
	}
	return s.closeErr
}

// Teardown closes the simulator, removes all its loop devices and deletes
// the state directory: test cleanup.
func (s *Sim) Teardown(ctx context.Context) error {
	err := s.Close(ctx)
	s.execMu.Lock()
	defer s.execMu.Unlock()
	if s.loops != nil {
		for dev := range s.loops.scan() {
			if derr := s.loops.detach(ctx, dev); derr != nil {
				err = errors.Join(err, derr)
			}
		}
	}
	if rerr := os.RemoveAll(s.cfg.StateDir); rerr != nil {
		err = errors.Join(err, rerr)
	}
	return err
}

// SetFaults replaces the injected faults.
func (s *Sim) SetFaults(f Faults) error {
	if err := f.Validate(); err != nil {
		return err
	}
	s.faultMu.Lock()
	s.faults = f
	s.faultMu.Unlock()
	s.mu.Lock()
	s.release(f)
	s.mu.Unlock()
	return nil
}

// Faults returns the injected faults.
func (s *Sim) Faults() Faults {
	s.faultMu.RLock()
	defer s.faultMu.RUnlock()
	return s.faults
}

// Stats returns a snapshot of the counters.
func (s *Sim) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := Stats{Calls: map[string]int64{}, AttachesSucceeded: map[string]int64{}, DetachesSucceeded: map[string]int64{}}
	for k, v := range s.calls {
		st.Calls[k] = v
	}
	for k, v := range s.st.Attaches {
		st.AttachesSucceeded[k] = v
	}
	for k, v := range s.st.Detaches {
		st.DetachesSucceeded[k] = v
	}
	for _, j := range s.st.Jobs {
		if j.Status == jobPending {
			st.PendingJobs++
		}
	}
	return st
}

// ExpungeJob forgets a finished job, as CloudStack does once a job is
// older than its job.expire.minutes: queryAsyncJobResult then answers 431,
// the job id naming nothing. It reports whether there was such a job; a
// pending job is kept.
func (s *Sim) ExpungeJob(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	j, ok := s.st.Jobs[id]
	if !ok || j.Status == jobPending {
		return false
	}
	delete(s.st.Jobs, id)
	if err := removeJob(s.cfg.StateDir, id); err != nil {
		s.log.Error("remove job", "job", id, "err", err.Error())
	}
	if err := s.st.save(s.cfg.StateDir); err != nil {
		s.log.Error("save state", "job", id, "err", err.Error())
	}
	return true
}

// LocalDevice returns the loop device and backing file of a volume that is
// attached to a VM with local devices.
func (s *Sim) LocalDevice(volumeID string) (LocalDevice, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, ok := s.st.Volumes[volumeID]
	if !ok || v.LoopDevice == "" {
		return LocalDevice{}, false
	}
	return LocalDevice{Path: v.LoopDevice, BackingFile: v.BackingFile}, true
}

// reconcileDevices re-creates the loop devices of volumes attached to VMs
// with local devices, and removes our loop devices nothing explains.
func (s *Sim) reconcileDevices(ctx context.Context) error {
	if s.loops == nil {
		return nil
	}
	s.execMu.Lock()
	defer s.execMu.Unlock()
	s.mu.Lock()
	want := map[string]*volume{} // backing file → volume
	for _, v := range s.st.Volumes {
		if v.BackingFile != "" && !v.Removed && s.local(v.VMID) {
			want[v.BackingFile] = v
		} else {
			v.LoopDevice = ""
		}
	}
	s.mu.Unlock()
	owned := s.loops.scan()
	kept := map[string]bool{}
	for dev, backing := range owned {
		if v, ok := want[backing]; ok && !kept[backing] {
			kept[backing] = true
			s.mu.Lock()
			v.LoopDevice = dev
			s.mu.Unlock()
			continue
		}
		s.log.Info("removing stray loop device", "device", dev, "backing", backing)
		if err := s.loops.detach(ctx, dev); err != nil {
			return err
		}
	}
	var errs []error
	for backing, v := range want {
		if kept[backing] {
			continue
		}
		dev, err := s.loops.attach(ctx, backing)
		if err != nil {
			errs = append(errs, fmt.Errorf("volume %s: %w", v.ID, err))
			continue
		}
		s.log.Info("re-created loop device", "volume", v.ID, "device", dev)
		s.mu.Lock()
		v.LoopDevice = dev
		s.mu.Unlock()
	}
	s.mu.Lock()
	err := s.st.save(s.cfg.StateDir)
	s.mu.Unlock()
	return errors.Join(append(errs, err)...)
}

// local reports whether a VM gets local devices (and they are enabled).
func (s *Sim) local(vmID string) bool {
	vm, ok := s.inv.vm(vmID)
	return ok && vm.LocalDevices && s.loops != nil
}
