package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"
)

// config is volumed's configuration, from flags with environment
// equivalents (a flag given on the command line wins).
type config struct {
	listen       string
	dataDir      string
	natsURL      string
	natsConfig   string
	natsReplicas int
	redisURL     string
	csURL        string
	csAPIKey     string
	csSecretKey  string
	vmID         string
	sim          bool
	simListen    string
	stepTimeout  time.Duration
	ackWait      time.Duration
	syncInterval time.Duration
	logLevel     slog.Level
}

// errUsage marks a configuration error (exit code 2).
var errUsage = errors.New("usage")

func parseConfig(args []string, stderr io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("volumed", flag.ContinueOnError)
	fs.SetOutput(stderr)
	env := func(name, def string) string {
		if v, ok := os.LookupEnv(name); ok {
			return v
		}
		return def
	}
	fs.StringVar(&c.listen, "listen", env("VOLUMED_LISTEN", "127.0.0.1:8090"), "REST API address (VOLUMED_LISTEN)")
	fs.StringVar(&c.dataDir, "data-dir", env("VOLUMED_DATA_DIR", "./volumed-data"), "directory for JetStream files and simulator state (VOLUMED_DATA_DIR)")
	fs.StringVar(&c.natsURL, "nats-url", env("VOLUMED_NATS_URL", ""), "external NATS URL; empty runs the embedded server (VOLUMED_NATS_URL)")
	fs.StringVar(&c.natsConfig, "nats-config", env("VOLUMED_NATS_CONFIG", ""), "embedded server config file; default ./nats.conf when present (VOLUMED_NATS_CONFIG)")
	replicas := fs.String("nats-replicas", env("VOLUMED_NATS_REPLICAS", "1"), "replicas of the streams and state bucket on a NATS cluster (VOLUMED_NATS_REPLICAS)")
	fs.StringVar(&c.redisURL, "redis-url", env("VOLUMED_REDIS_URL", ""), "Redis URL for state; empty uses the embedded store (VOLUMED_REDIS_URL)")
	fs.StringVar(&c.csURL, "cloudstack-url", env("CLOUDSTACK_API_URL", ""), "CloudStack API URL, e.g. http://host:8080/client/api (CLOUDSTACK_API_URL)")
	fs.StringVar(&c.csAPIKey, "cloudstack-api-key", env("CLOUDSTACK_API_KEY", ""), "CloudStack API key (CLOUDSTACK_API_KEY)")
	fs.StringVar(&c.csSecretKey, "cloudstack-secret-key", env("CLOUDSTACK_SECRET_KEY", ""), "CloudStack secret key (CLOUDSTACK_SECRET_KEY)")
	fs.StringVar(&c.vmID, "vm-id", env("VOLUMED_VM_ID", ""), "the CloudStack VM this host is (VOLUMED_VM_ID)")
	sim := fs.String("sim", env("VOLUMED_SIM", "false"), "run the CloudStack simulator in-process and use its appliance VM as --vm-id (VOLUMED_SIM)")
	fs.StringVar(&c.simListen, "sim-listen", env("VOLUMED_SIM_LISTEN", "127.0.0.1:8080"), "address of the in-process simulator (VOLUMED_SIM_LISTEN)")
	stepTimeout := fs.String("step-timeout", env("VOLUMED_STEP_TIMEOUT", "5m"), "deadline of each CloudStack step; an operation past it fails (VOLUMED_STEP_TIMEOUT)")
	ackWait := fs.String("ack-wait", env("VOLUMED_ACK_WAIT", "15s"), "how soon a job is redelivered after a crash (VOLUMED_ACK_WAIT)")
	syncInterval := fs.String("sync-interval", env("VOLUMED_SYNC_INTERVAL", "5m"), "period of the background reconcile; 0 turns it off (VOLUMED_SYNC_INTERVAL)")
	logLevel := fs.String("log-level", env("VOLUMED_LOG_LEVEL", "info"), "debug, info, warn or error (VOLUMED_LOG_LEVEL)")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: volumed [flags]\n\nvolumed manages CloudStack block volumes for this host. Flags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return c, err
		}
		return c, fmt.Errorf("%w: %w", errUsage, err)
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("%w: unexpected argument %q", errUsage, fs.Arg(0))
	}
	var err error
	bad := func(name string, e error) error { return fmt.Errorf("%w: --%s: %w", errUsage, name, e) }
	if c.natsReplicas, err = strconv.Atoi(*replicas); err != nil || c.natsReplicas < 1 || c.natsReplicas > 5 {
		return c, bad("nats-replicas", fmt.Errorf("want 1 to 5, got %q", *replicas))
	}
	if c.sim, err = strconv.ParseBool(*sim); err != nil {
		return c, bad("sim", err)
	}
	for name, p := range map[string]struct {
		s   string
		dst *time.Duration
		min time.Duration
	}{
		"step-timeout":  {*stepTimeout, &c.stepTimeout, time.Second},
		"ack-wait":      {*ackWait, &c.ackWait, time.Second},
		"sync-interval": {*syncInterval, &c.syncInterval, 0},
	} {
		d, err := time.ParseDuration(p.s)
		if err != nil || d < p.min {
			return c, bad(name, fmt.Errorf("want a duration of at least %v, got %q", p.min, p.s))
		}
		*p.dst = d
	}
	if c.syncInterval == 0 {
		c.syncInterval = -1
	}
	if err := c.logLevel.UnmarshalText([]byte(*logLevel)); err != nil {
		return c, bad("log-level", err)
	}
	if c.natsConfig == "" {
		if _, err := os.Stat("nats.conf"); err == nil {
			c.natsConfig = "nats.conf"
		}
	}
	if !c.sim {
		var missing []string
		for name, v := range map[string]string{"cloudstack-url": c.csURL, "cloudstack-api-key": c.csAPIKey,
			"cloudstack-secret-key": c.csSecretKey} {
			if v == "" {
				missing = append(missing, "--"+name)
			}
		}
		if len(missing) > 0 {
			sort.Strings(missing)
			return c, fmt.Errorf("%w: %s required without --sim", errUsage, strings.Join(missing, ", "))
		}
	}
	return c, nil
}
