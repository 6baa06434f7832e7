package config

import (
	"strings"
	"testing"
)

func TestBackendAPI(t *testing.T) {
	tests := []struct {
		name    string
		body    string
		want    API
		wantErr string
	}{
		{"default rbee", "[backends.x]\ncommand = [\"/bin/x\"]\n", APIRbee, ""},
		{"openai", "[backends.x]\ncommand = [\"/bin/x\"]\napi = \"openai\"\nnative_completion = true\nparallel = 2\n", APIOpenAI, ""},
		{"unknown api", "[backends.x]\ncommand = [\"/bin/x\"]\napi = \"grpc\"\n", "", "backends.x.api"},
		{"native without openai", "[backends.x]\ncommand = [\"/bin/x\"]\nnative_completion = true\n", "", "backends.x.native_completion"},
		{"negative parallel", "[backends.x]\ncommand = [\"/bin/x\"]\nparallel = -1\n", "", "backends.x.parallel"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := Load(writeConfig(t, tc.body), true)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one naming %s", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := cfg.Backends["x"].API; got != tc.want {
				t.Errorf("api %q, want %q", got, tc.want)
			}
		})
	}
}
