package httpbridge_test

import (
	"flag"
	"fmt"
	"os"
	"testing"

	"github.com/volumed/volumed/internal/apitest"
)

// validator checks every response of every test against the OpenAPI
// document and counts the documented operations exercised.
var validator *apitest.Validator

// TestMain fails a full run (no -run filter) that left a documented
// operation unexercised.
func TestMain(m *testing.M) {
	flag.Parse()
	var err error
	if validator, err = apitest.Load(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	if code == 0 && flag.Lookup("test.run").Value.String() == "" {
		if missing := validator.Unexercised(); len(missing) > 0 {
			fmt.Fprintf(os.Stderr, "FAIL: documented operations no test exercised: %v\n", missing)
			code = 1
		}
	}
	os.Exit(code)
}
