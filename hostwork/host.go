// Package hostwork is volumed's host work: the NBD export records, the
// NBD server that serves this host's exports (Exporter, NBDExporter), and
// the per-VM host subjects (volumed.hosts.<vm_id>.exports) through which
// the instance running an operation has the instance serving a VM sync
// its served set. The engine reaches it through narrow interfaces, so it
// imports neither nbd nor devagent.
package hostwork

import (
	"context"
	"fmt"
	"log/slog"
	"sync"

	"github.com/nats-io/nats.go"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/state"
)

// Store is the part of the state store the host work uses: export
// records, and mappings to read.
type Store interface {
	state.Exports
	state.MappingReader
}

// Config configures a Host.
type Config struct {
	// Conn carries the host subjects and the mapping events; required.
	Conn *nats.Conn
	// Store holds the export records; required.
	Store Store
	// VMID is the CloudStack VM this host is.
	VMID string
	// Exporter serves this host's export records over NBD; nil when the
	// NBD server is off.
	Exporter Exporter
	// AutoExport exports, read-only, every volume attached to this host
	// as soon as its device is found.
	AutoExport bool
	// QueueGroup is the NATS queue group of the host subject.
	QueueGroup string
	// Logger receives the host work's logs.
	Logger *slog.Logger
}

// Host does this instance's host work and asks other instances for
// theirs.
type Host struct {
	cfg      Config
	log      *slog.Logger
	ctx      context.Context
	cancel   context.CancelFunc
	subs     []*nats.Subscription
	exportMu sync.Mutex
}

// New returns a Host; Start runs it.
func New(cfg Config) *Host {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	h := &Host{cfg: cfg, log: cfg.Logger}
	h.ctx, h.cancel = context.WithCancel(context.Background())
	return h
}

// Start restores this host's served exports from the records and, with an
// NBD server, subscribes to the mapping events and this VM's host subject.
func (h *Host) Start(ctx context.Context) error {
	if changes, err := h.Reconcile(ctx, false); err != nil {
		h.log.Warn("exports not restored", "err", err)
	} else if len(changes) > 0 {
		h.log.Info("exports restored from state", "changes", changes)
	}
	if h.cfg.Exporter == nil {
		return nil
	}
	sub, err := h.cfg.Conn.Subscribe(commands.SubjectMappingsPrefix+">", bus.Published(h.onMapping))
	if err != nil {
		return fmt.Errorf("hostwork: subscribe mappings: %w", err)
	}
	h.subs = append(h.subs, sub)
	if h.cfg.VMID != "" {
		// Export work for this VM comes here, whoever runs its operation.
		if sub, err = h.cfg.Conn.QueueSubscribe(hostSubject(h.cfg.VMID), h.cfg.QueueGroup, bus.Published(h.onHostRequest)); err != nil {
			return fmt.Errorf("hostwork: subscribe %s: %w", hostSubject(h.cfg.VMID), err)
		}
		h.subs = append(h.subs, sub)
	}
	return nil
}

// Stop unsubscribes and ends the host requests being answered.
func (h *Host) Stop() {
	for _, sub := range h.subs {
		_ = sub.Unsubscribe()
	}
	h.cancel()
}

// Ping checks that a volumed with an NBD server serves vmID.
func (h *Host) Ping(ctx context.Context, vmID string) error {
	if _, err := h.askHost(ctx, vmID, hostRequest{Action: hostPing}); err != nil {
		return hostError(err)
	}
	return nil
}

// Serving reports whether this instance runs an NBD server.
func (h *Host) Serving() bool { return h.cfg.Exporter != nil }

// VMID is the VM this host is.
func (h *Host) VMID() string { return h.cfg.VMID }

// Record returns a volume's export record.
func (h *Host) Record(ctx context.Context, volumeID string) (commands.Export, error) {
	return h.cfg.Store.GetExport(ctx, volumeID)
}
