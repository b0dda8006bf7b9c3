// Command volumed is the volume daemon: it manages CloudStack block volumes
// for the host it runs on, behind a REST API and NATS subjects.
//
// Exit codes: 0 after a clean shutdown, 1 when a component fails, 2 for a
// configuration error or data this release will not read (too new, or
// too old to migrate; see internal/upgrade).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"slices"
	"syscall"
	"time"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/correlate"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/devagent"
	"github.com/volumed/volumed/handlers"
	"github.com/volumed/volumed/hostwork"
	"github.com/volumed/volumed/httpbridge"
	"github.com/volumed/volumed/internal/netaddr"
	"github.com/volumed/volumed/internal/upgrade"
	"github.com/volumed/volumed/internal/upgrade/identity"
	"github.com/volumed/volumed/internal/version"
	"github.com/volumed/volumed/lease"
	"github.com/volumed/volumed/metrics"
	"github.com/volumed/volumed/nbd"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/stores/redisstore"
)

var (
	_ httpbridge.Backend        = (*handlers.Service)(nil)
	_ httpbridge.Commands       = (*handlers.Service)(nil)
	_ handlers.DeviceCorrelator = (*correlate.Correlator)(nil)
)

// shutdownTimeout bounds the clean shutdown after SIGINT or SIGTERM, of
// which each component closed gets at least minCloseTimeout.
const (
	shutdownTimeout = 30 * time.Second
	minCloseTimeout = 5 * time.Second
)

func main() { os.Exit(run(os.Args[1:], os.Stderr)) }

// run maps every outcome to an exit code, in one place.
func run(args []string, stderr io.Writer) int {
	if slices.Contains(args, "--version") || slices.Contains(args, "-version") {
		fmt.Fprintln(os.Stdout, "volumed", version.String())
		return 0
	}
	cfg, err := parseConfig(args, stderr)
	switch {
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		fmt.Fprintln(stderr, "volumed:", err)
		return 2
	case err != nil:
		fmt.Fprintln(stderr, "volumed:", err)
		return 1
	}
	if cfg.creds != nil {
		if err := runCreds(cfg, os.Stdout, stderr); err != nil {
			fmt.Fprintln(stderr, "volumed:", err)
			return 1
		}
		return 0
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: cfg.logLevel}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := serve(ctx, cfg, log); err != nil {
		log.Error("volumed failed", "err", err)
		if errors.Is(err, errUsage) || errors.Is(err, upgrade.ErrRefused) {
			return 2
		}
		return 1
	}
	return 0
}

// component is anything with the Close(ctx) lifecycle.
type component interface {
	Close(ctx context.Context) error
}

// serve wires the components, runs until ctx ends, then closes them in
// reverse order.
func serve(ctx context.Context, cfg config, log *slog.Logger) (err error) {
	var started []component
	defer func() {
		deadline := time.Now().Add(shutdownTimeout)
		for i := len(started) - 1; i >= 0; i-- {
			// What is left of the budget, but never less than
			// minCloseTimeout: a slow component does not starve those
			// closed after it (the store, the bus and its server).
			cctx, cancel := context.WithTimeout(context.Background(), max(time.Until(deadline), minCloseTimeout))
			if cerr := started[i].Close(cctx); cerr != nil {
				log.Warn("close", "err", cerr)
			}
			cancel()
		}
		if err == nil {
			log.Info("volumed stopped")
		}
	}()
	if cfg.natsURL != "" && cfg.natsCreds == "" {
		// Not refused: an unauthenticated external server is the user's choice.
		log.Warn("connecting to --nats-url without --nats-creds: the server must accept anonymous clients",
			"nats", cfg.natsURL)
	}
	if cfg.agentOnly {
		busTLS, err := agentBusTLS(cfg)
		if err != nil {
			return err
		}
		b := bus.New(bus.Config{URL: cfg.natsURL, ClientOnly: true, Name: "volumed-agent", Logger: log,
			Creds: cfg.natsCreds, InboxPrefix: bus.AgentInboxPrefix(cfg.vmID), TLS: busTLS})
		if err := b.Start(ctx); err != nil {
			return err
		}
		started = append(started, b)
		agent, more, err := startAgent(ctx, cfg, b, log)
		started = append(started, more...)
		if err != nil {
			return err
		}
		log.Info("device agent ready", "vm_id", cfg.vmID, "nats", cfg.natsURL, "devices", len(agent.Devices()),
			"name_dir", cfg.nameDir)
		<-ctx.Done()
		return nil
	}
	if err := os.MkdirAll(cfg.dataDir, 0o750); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	lock, err := lockDataDir(cfg.dataDir)
	if err != nil {
		return err
	}
	started = append(started, lock)
	if cfg.pprofListen != "" {
		p, err := startPprof(cfg.pprofListen, log)
		if err != nil {
			return err
		}
		started = append(started, p)
	}
	tokenSource, err := ensureToken(&cfg)
	if err != nil {
		return err
	}
	sec, more, err := startSecurity(ctx, cfg, log)
	started = append(started, more...)
	if err != nil {
		return err
	}
	sec.reloadOnHUP(ctx, cfg, log)
	busTLS, err := sec.busTLS(cfg)
	if err != nil {
		return err
	}
	b := bus.New(bus.Config{URL: cfg.natsURL, ConfigFile: cfg.natsConfig, DataDir: cfg.dataDir,
		CredsDir: credsDir(cfg.dataDir), Creds: cfg.natsCreds, ServiceCreds: cfg.natsServiceCreds, Replicas: cfg.natsReplicas, Logger: log, TLS: busTLS})
	if err := b.Start(ctx); err != nil {
		return err
	}
	started = append(started, b)

	var store state.Store
	storeName := "embedded"
	if cfg.redisURL != "" {
		storeName = "redis"
		store, err = redisstore.New(ctx, redisstore.Config{URL: cfg.redisURL, Logger: log})
	} else {
		cache, archive := state.KVFiles(cfg.dataDir)
		store, err = state.NewKV(ctx, b.JetStream(), state.KVConfig{Replicas: cfg.natsReplicas, Logger: log,
			IndexCache: cache, Archive: archive})
	}
	if err != nil {
		return fmt.Errorf("state store: %w", err)
	}
	started = append(started, store)
	if err := state.Upgrade(ctx, store, log); err != nil {
		return fmt.Errorf("state store: %w", err)
	}
	if cfg.opRetention > 0 {
		retention, err := lease.NewRetention(lease.RetentionConfig{Store: store, Keep: cfg.opRetention, Logger: log})
		if err != nil {
			return fmt.Errorf("retention: %w", err)
		}
		if err := retention.Start(ctx); err != nil {
			return fmt.Errorf("retention: %w", err)
		}
		started = append(started, retention)
	}

	var localStatus func() devagent.Status
	if cfg.deviceAgent && cfg.vmID != "" {
		agent, more, err := startAgent(ctx, cfg, b, log)
		started = append(started, more...)
		if err != nil {
			return err
		}
		localStatus = agent.Status
		if err := identity.Backfill(ctx, store, cfg.vmID, agent.Devices(), log); err != nil {
			return err
		}
	}
	corr := correlate.New(correlate.Config{Conn: b.Conn(), Store: store, Timeout: cfg.correlateAfter,
		LocalVMID: cfg.vmID, LocalStatus: localStatus, Logger: log})
	if err := corr.Start(ctx); err != nil {
		return err
	}
	started = append(started, corr)

	var exporter hostwork.Exporter
	var nbdStats metrics.NBDStats
	nbdAddr := "off"
	if cfg.nbdListen != "" {
		// TLS is always offered; off loopback it is required.
		tlsCfg, more, err := sec.nbdTLS(ctx, cfg, log)
		started = append(started, more...)
		if err != nil {
			return err
		}
		srv, err := nbd.New(nbd.Config{Listen: cfg.nbdListen, TLS: tlsCfg, RequireTLS: !netaddr.IsLoopback(cfg.nbdListen), Logger: log})
		if err != nil {
			return err
		}
		if err := srv.Start(ctx); err != nil {
			return err
		}
		started = append(started, srv)
		exporter, nbdStats, nbdAddr = hostwork.NBDExporter{Server: srv}, srv, srv.Addr().String()
		log.Info("nbd server ready", "addr", nbdAddr, "auto_export", cfg.nbdAutoExport, "tls_required", !netaddr.IsLoopback(cfg.nbdListen))
	}

	cs := csapi.New(csapi.Config{URL: cfg.csURL, APIKey: cfg.csAPIKey, SecretKey: cfg.csSecretKey, Logger: log})
	svc := handlers.New(handlers.Config{Conn: b.Conn(), ServiceConn: b.ServiceConn(), JetStream: b.JetStream(), Store: store, CloudStack: cs,
		StoreName: storeName, VMID: cfg.vmID, Devices: corr, Exporter: exporter, AutoExport: cfg.nbdAutoExport,
		StepTimeout: cfg.stepTimeout, StopGrace: cfg.stopGrace, AckWait: cfg.ackWait, SyncInterval: cfg.syncInterval, Version: version.Semver(), Logger: log})
	prom, err := metrics.New(metrics.Config{Conn: b.Conn(), JetStream: b.JetStream(), Counters: svc, NBD: nbdStats, Logger: log})
	if err != nil {
		return err
	}
	if err := prom.Start(ctx); err != nil {
		return err
	}
	started = append(started, prom)

	if err := handlers.RelineJobs(ctx, b.JetStream(), store, log); err != nil {
		return err
	}
	if err := svc.Start(ctx); err != nil {
		return err
	}
	started = append(started, svc)

	bridge := httpbridge.New(httpbridge.Config{Listen: cfg.listen, Conn: b.Conn(), Commands: svc, Store: store, Backend: svc,
		VMID: cfg.vmID, Token: cfg.apiToken, Tokens: sec.tokens, TLS: sec.apiTLS(cfg), Logger: log, Prometheus: prom.Handler()})
	if err := bridge.Start(ctx); err != nil {
		return err
	}
	started = append(started, bridge)

	log.Info("volumed ready", "api", bridge.URL(), "nats", b.ClientURL(),
		"nats_embedded", b.Embedded(), "store", storeName, "cloudstack", cfg.csURL,
		"vm_id", cfg.vmID, "device_agent", localStatus != nil, "nbd", nbdAddr, "data_dir", cfg.dataDir,
		"nats_operator_creds", b.CredsFile(bus.RoleOperator), "api_token", tokenSource,
		"api_token_required", !netaddr.IsLoopback(cfg.listen), "tls_ca", cfg.tls.caFile(cfg.dataDir))
	<-ctx.Done()
	log.Info("shutting down; unfinished operations resume at the next start")
	return nil
}

// startAgent starts the device agent for cfg.vmID and its NATS side; it
// returns what it started, to be closed, even on error.
func startAgent(ctx context.Context, cfg config, b *bus.Bus, log *slog.Logger) (*devagent.Agent, []component, error) {
	agent := devagent.New(devagent.Config{VMID: cfg.vmID, ScanInterval: cfg.scanInterval, Logger: log})
	if err := agent.Start(ctx); err != nil {
		return nil, nil, fmt.Errorf("device agent: %w", err)
	}
	srv := devagent.NewServer(devagent.ServerConfig{VMID: cfg.vmID, Conn: b.Conn(), JetStream: b.JetStream(),
		Agent: agent, Namer: devagent.NewNames(cfg.nameDir, cfg.dmsetup), Logger: log})
	if err := srv.Start(ctx); err != nil {
		return agent, []component{agent}, fmt.Errorf("device agent: %w", err)
	}
	return agent, []component{agent, srv}, nil
}
