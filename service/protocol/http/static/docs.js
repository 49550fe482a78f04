"use strict";
// Swagger UI over this server's openapi.json. validatorUrl null: by default Swagger UI loads a
// badge from the public validator, and graft's pages reach no other host. BaseLayout has no
// top bar, so no field points the page at another document; queryConfigEnabled stays off for
// the same reason.
window.ui = SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  validatorUrl: null,
  queryConfigEnabled: false,
  deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
