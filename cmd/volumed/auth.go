package main

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/httpbridge"
)

// tokenEnv is the environment variable of --api-token; it is not the
// flag's default, so --help cannot print it.
const tokenEnv = "VOLUMED_API_TOKEN"

// tokenFileName is the REST token's file in the data dir, made at first
// start when no token is configured.
const tokenFileName = "api-token"

// natsCreds adds --nats-creds.
func (f *flagSet) natsCreds(c *config) {
	f.str(&c.natsCreds, "nats-creds", "VOLUMED_NATS_CREDS", "",
		"NATS credentials file (the nats --creds format) to connect to --nats-url with")
}

// natsServiceCreds adds --nats-service-creds.
func (f *flagSet) natsServiceCreds(c *config) {
	f.str(&c.natsServiceCreds, "nats-service-creds", "VOLUMED_NATS_SERVICE_CREDS", "",
		"NATS credentials file the command service connects to --nats-url with, the service role's (<data-dir>/creds/service.creds); empty answers commands and discovery with --nats-creds")
}

// checkSecurity validates the credential flags and reads a configured
// token file.
func (c *config) checkSecurity() error {
	if c.natsCreds != "" && c.natsURL == "" {
		return fmt.Errorf("%w: --nats-creds needs --nats-url (the embedded server's credentials are made in <data-dir>/creds)", errUsage)
	}
	if c.natsServiceCreds != "" && c.natsURL == "" {
		return fmt.Errorf("%w: --nats-service-creds needs --nats-url (the embedded server's credentials are made in <data-dir>/creds)", errUsage)
	}
	if c.apiToken == "" {
		c.apiToken = os.Getenv(tokenEnv)
	}
	if c.apiToken == "" && c.apiTokenFile != "" {
		data, err := os.ReadFile(c.apiTokenFile)
		if err != nil {
			return fmt.Errorf("%w: --api-token-file: %w", errUsage, err)
		}
		c.apiToken = strings.TrimSpace(string(data))
		if c.apiToken == "" {
			return fmt.Errorf("%w: --api-token-file %s is empty", errUsage, c.apiTokenFile)
		}
	}
	if c.apiToken != "" {
		if err := httpbridge.CheckToken(c.apiToken); err != nil {
			return fmt.Errorf("%w: %w", errUsage, err)
		}
	}
	return nil
}

// ensureToken makes sure the REST API has a token: the configured one, or
// <data-dir>/api-token, generated (0600) at first start. A short token
// file is a configuration error (errUsage).
func ensureToken(c *config) (source string, err error) {
	if c.apiToken != "" {
		return "configured", nil
	}
	path := filepath.Join(c.dataDir, tokenFileName)
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		var raw [32]byte
		_, _ = rand.Read(raw[:])
		data = []byte(hex.EncodeToString(raw[:]) + "\n")
		if err = bus.WriteSecret(path, data, true); errors.Is(err, fs.ErrExist) {
			data, err = os.ReadFile(path) // another process made it first: use that one
		}
	}
	if err != nil {
		return "", fmt.Errorf("api token %s: %w", path, err)
	}
	c.apiToken = strings.TrimSpace(string(data))
	if err := httpbridge.CheckToken(c.apiToken); err != nil {
		return "", fmt.Errorf("%w: %s: %w", errUsage, path, err)
	}
	return path, nil
}
