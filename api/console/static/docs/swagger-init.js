// Swagger UI on this service's OpenAPI document, with nothing fetched from elsewhere: no validator badge
// (validator.swagger.io), and the "Try it out" requests go to this origin.
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  validatorUrl: null,
  deepLinking: true,
  showExtensions: true,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
  layout: "BaseLayout",
});
